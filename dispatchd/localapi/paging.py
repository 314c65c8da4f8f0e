"""Opaque page tokens for keyset pagination.

A token carries the sort key and id of the last row served, the page size and
a fingerprint of the request it continues (microgrid, filter, sort), so a page
boundary never depends on offsets: rows created or deleted between two pages
do not shift the rest of the listing.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
from dataclasses import dataclass

from frequenz.api.dispatch.v1.dispatch_pb2 import DispatchFilter, SortOptions

from dispatchd.localapi.validation import InvalidRequest

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000
MAX_TOKEN_LENGTH = 256
"""Tokens this server issues are under 100 characters; longer ones are forged."""
_VERSION = 1


@dataclass(frozen=True, slots=True)
class PageToken:
    """Where the next page starts: strictly after ``(last_key, last_id)``."""

    last_key: int
    last_id: int
    page_size: int
    fingerprint: str


def fingerprint(microgrid_id: int, filter_: DispatchFilter, sort: SortOptions) -> str:
    """Identifies the listing a token belongs to (deterministic serialisation)."""
    digest = hashlib.sha256()
    digest.update(str(microgrid_id).encode())
    digest.update(filter_.SerializeToString(deterministic=True))
    digest.update(sort.SerializeToString(deterministic=True))
    return digest.hexdigest()[:16]


def page_size_of(requested: int) -> int:
    """Unset means the default; too large is capped, not refused."""
    if requested <= 0:
        return DEFAULT_PAGE_SIZE
    return min(requested, MAX_PAGE_SIZE)


def encode(token: PageToken) -> str:
    """Serialise as URL-safe base64 of a small JSON document."""
    body = json.dumps(
        [_VERSION, token.last_key, token.last_id, token.page_size, token.fingerprint],
        separators=(",", ":"),
    )
    return base64.urlsafe_b64encode(body.encode()).decode().rstrip("=")


def decode(text: str, expected_fingerprint: str) -> PageToken:
    """Parse a token from a client; anything odd is INVALID_ARGUMENT, never a crash."""
    if len(text) > MAX_TOKEN_LENGTH:
        raise InvalidRequest("pagination_params.page_token", "malformed token")
    try:
        padded = text + "=" * (-len(text) % 4)
        fields = json.loads(base64.urlsafe_b64decode(padded.encode()))
        version, last_key, last_id, page_size, mark = fields
    except (ValueError, TypeError, RecursionError, binascii.Error) as error:
        raise InvalidRequest("pagination_params.page_token", "malformed token") from error
    valid = (
        version == _VERSION
        and all(isinstance(value, int) for value in (last_key, last_id, page_size))
        and all(abs(value) < 2**63 for value in (last_key, last_id))
        and isinstance(mark, str)
        and 0 < page_size <= MAX_PAGE_SIZE
    )
    if not valid:
        raise InvalidRequest("pagination_params.page_token", "malformed token")
    if mark != expected_fingerprint:
        raise InvalidRequest(
            "pagination_params.page_token", "belongs to a different filter or sort order"
        )
    return PageToken(last_key, last_id, page_size, mark)
