"""Schemathesis checks for Offload's promise that every error is a problem body.

Loaded by scripts/fuzz-api.sh through SCHEMATHESIS_HOOKS.
"""
import schemathesis


@schemathesis.check
def problem_bodies(ctx, response, case):
    """Every 4xx and 5xx answer is application/problem+json with a type URI and a detail."""
    if response.status_code < 400:
        return None
    content_type = response.headers.get("content-type", [""])
    if isinstance(content_type, list):
        content_type = content_type[0] if content_type else ""
    if content_type != "application/problem+json":
        raise AssertionError(
            f"{response.status_code} answered with content-type {content_type!r}, "
            "not application/problem+json"
        )
    body = response.json()
    if not str(body.get("type", "")).startswith("https://"):
        raise AssertionError(f"problem body without a type URI: {body}")
    if not body.get("detail"):
        raise AssertionError(f"problem body without a detail: {body}")
    if body.get("status") not in (None, response.status_code):
        raise AssertionError(f"problem status {body.get('status')} != {response.status_code}")
    return None
