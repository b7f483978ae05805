"""Wire types (msgspec Structs) for the OpenAI API and the specs' extensions."""
