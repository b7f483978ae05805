"""The pre-encoded streaming chunk (`text_chunk_parts`) is byte for byte what encoding the
whole chunk gives, for any text (escapes, non-ASCII, line separators) and choice index."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from ferroserve.api.chat import text_chunk_parts
from ferroserve.api.generate import encode, sse

HEAD = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": 'model "q"\\', "system_fingerprint": "fp_1"}


@pytest.mark.parametrize("include_usage", [False, True])
@given(text=st.text(), index=st.integers(0, 3))
def test_pre_encoded_text_chunk_equals_the_encoded_chunk(include_usage, text, index):
    heads, tail = text_chunk_parts(HEAD, 4, include_usage)
    body = {**HEAD, "choices": [{"index": index, "delta": {"content": text}, "logprobs": None, "finish_reason": None}]}
    if include_usage:
        body["usage"] = None
    assert heads[index] + encode(text) + tail == sse(encode(body))
