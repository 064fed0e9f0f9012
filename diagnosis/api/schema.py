"""Changes to the generated OpenAPI schema that drf-spectacular's decorators cannot express."""


def declare_retry_after(result, generator, request, public):
    """Every 429 says in its Retry-After header how many seconds to wait (README): a generated
    client is told where to look. (OpenApiResponse takes no headers.)"""
    for operations in result.get("paths", {}).values():
        for operation in operations.values():
            if rate_limited := operation.get("responses", {}).get("429"):
                rate_limited.setdefault("headers", {})["Retry-After"] = {
                    "schema": {"type": "integer"},
                    "description": "seconds to wait before trying again",
                }
    return result
