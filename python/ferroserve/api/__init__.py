"""One module per API resource: parse, call the backend, shape the response."""
