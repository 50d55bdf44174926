"""img2dataset's per-sample error strings -> the row statuses documented in docs/schema.md.

img2dataset reports a failed sample as ``str(exception)``; our own guards (curate.download.net,
robots, the checked resizer) raise messages that start with ``curate:<status>:``, so they are read
back exactly. Everything else is matched on the messages urllib, http.client, ssl and img2dataset's
resizer produce. The raw message is always kept in the row's ``error`` column.
"""

from __future__ import annotations

import re

# status -> meaning; docs/schema.md lists the same codes (tests keep the two in step).
STATUSES: dict[str, str] = {
    "ok": "downloaded, decoded and resized; `image` holds the encoded result",
    "bad_url": "empty, malformed, or not an http(s) URL (file://, ftp://, data: are refused), also when "
    "a redirect leads to one",
    "blocked_address": "the host resolves to (or redirects to) a loopback, private, link-local, multicast or "
    "reserved address that `allow_private_addresses` does not allow; nothing was sent to it",
    "dns_error": "the host name does not resolve",
    "connection_error": "connection refused, reset or closed before a complete response",
    "tls_error": "TLS handshake or certificate failure",
    "timeout": "no complete response within `timeout` seconds (redirects included; slow or trickling servers)",
    "http_<code>": "the server answered with this HTTP status, e.g. http_404, http_403, http_500",
    "redirect_error": "too many redirects, a redirect loop, or a redirect to a file:// URL",
    "response_too_large": "the response exceeded `max_response_bytes`",
    "opted_out": "an X-Robots-Tag header carried one of `disallowed_header_directives` (noai, noimageai, ...)",
    "robots_disallowed": "the host's robots.txt disallows the URL for `user_agent_token` (or answered 5xx)",
    "not_an_image": "the body is not an image format Pillow recognises (an HTML page, text, ...)",
    "decode_error": "the image format is recognised but the data cannot be decoded",
    "truncated": "the image data ends early",
    "too_large": "more pixels than `max_pixels` (refused from the header, before decoding)",
    "too_small": "the shorter side is below `min_image_size`",
    "bad_aspect_ratio": "longer side / shorter side above `max_aspect_ratio`",
    "resize_error": "img2dataset's resizer failed for another reason",
    "download_error": "any other download failure (message in `error`)",
    "internal_error": "img2dataset returned no result for the row (a bug; the row is kept, the reason logged)",
}

_CURATE = re.compile(r"curate:([a-z_0-9]+):")
_HTTP = re.compile(r"HTTP Error (\d{3})")

_REDIRECT = ("redirect error that would lead to an infinite loop", "Redirection to url")
_RULES: list[tuple[str, tuple[str, ...]]] = [
    ("opted_out", ("disallowed by X-Robots-Tag",)),
    (
        "bad_url",
        (
            "unknown url type",
            "no host given",
            "URL can't contain control characters",
            "nonnumeric port",
            "Invalid URL",
            "invalid literal for int() with base 10",
        ),
    ),
    ("tls_error", ("SSL", "CERTIFICATE", "certificate")),
    ("timeout", ("timed out", "timeout")),
    (
        "dns_error",
        (
            "Name or service not known",
            "nodename nor servname",
            "getaddrinfo failed",
            "Temporary failure in name resolution",
            "No address associated with hostname",
        ),
    ),
    (
        "connection_error",
        (
            "Connection refused",
            "Connection reset",
            "Remote end closed connection",
            "IncompleteRead",
            "Broken pipe",
            "Network is unreachable",
            "No route to host",
            "BadStatusLine",
            "LineTooLong",
            "got more than",
            "Connection aborted",
        ),
    ),
    ("too_small", ("image too small",)),
    ("bad_aspect_ratio", ("aspect ratio too large",)),
    ("too_large", ("image area too large",)),
    ("decode_error", ("Image decoding error",)),
]


def classify(message: str, stage: str = "download") -> str:
    """A status for an img2dataset error message; ``stage`` is 'download' or 'resize' (the fallback)."""
    found = _CURATE.search(message)
    if found:
        return found.group(1)
    if any(n in message for n in _REDIRECT):
        return "redirect_error"
    found = _HTTP.search(message)
    if found:
        return f"http_{found.group(1)}"
    for status, needles in _RULES:
        if any(n in message for n in needles):
            return status
    return "resize_error" if stage == "resize" else "download_error"


def is_documented(status: str) -> bool:
    return status in STATUSES or bool(re.fullmatch(r"http_\d{3}", status))
