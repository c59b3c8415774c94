"""schemathesis hooks for tests/test_fuzz_http.py: generation requests stay a few tokens long.

A fuzzed max_tokens anywhere in [5, 2**32-1] is valid and would be run to the end of the
context, as would a null or absent one where the field is optional; each becomes 4, so the case
keeps its validity and costs a fraction of a second on a CPU. Values out of range, or of another
type, are left alone: their refusal is what such a case tests.
"""

from __future__ import annotations

from typing import Any

import schemathesis
from schemathesis import Case
from schemathesis.hooks import HookContext

MAX_TOKENS = 4
_UINT32_MAX = (1 << 32) - 1
LIMITS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
# Where the limit is optional, its absence means "until the context ends": give one.
DEFAULT_LIMIT = {
    "/v1/chat/completions": "max_tokens",
    "/v1/completions": "max_tokens",
    "/v1/responses": "max_output_tokens",
}


@schemathesis.hook
def before_call(context: HookContext, case: Case[Any], kwargs: dict[str, Any]) -> None:
    body = case.body
    if not isinstance(body, dict):
        return
    default = DEFAULT_LIMIT.get(case.operation.path)
    for name in LIMITS:
        if name not in body:
            continue
        value = body[name]
        if type(value) is int and MAX_TOKENS < value <= _UINT32_MAX:
            body[name] = MAX_TOKENS
        elif value is None and default is not None:
            # null is "no limit" where the field is optional: as long as the context.
            body[name] = MAX_TOKENS
    if default is not None and not any(name in body for name in LIMITS):
        body[default] = MAX_TOKENS
