"""Property-based fuzzing of the REST API from its own OpenAPI schema: no input may cause a 5xx."""

import pytest
import schemathesis
from django.core import signals
from django.db import close_old_connections
from hypothesis import HealthCheck, settings

from malaria_site.wsgi import application
from tests.factories import UserFactory, api_key

schema = schemathesis.openapi.from_wsgi("/api/schema/", application)


@pytest.fixture
def fuzz_token(db) -> str:
    # Calling the WSGI app directly would close the test's database connection after each request;
    # Django's own test client avoids that the same way.
    signals.request_started.disconnect(close_old_connections)
    signals.request_finished.disconnect(close_old_connections)
    yield api_key(UserFactory())
    signals.request_started.connect(close_old_connections)
    signals.request_finished.connect(close_old_connections)


@schema.parametrize()
# The same draws on every run (derived from the test): a failure CI finds is one anyone can repeat,
# and a landing is not refused for a draw that the run before it never made.
@settings(max_examples=30, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
def test_no_server_errors(case, fuzz_token):
    response = case.call(headers={"Authorization": f"Token {fuzz_token}"})
    assert response.status_code < 500, f"{case.method} {case.formatted_path} -> {response.status_code}"


def test_schema_is_public_and_lists_the_endpoints(client):
    response = client.get("/api/schema/", HTTP_ACCEPT="application/json")
    assert response.status_code == 200
    paths = response.json()["paths"]
    for path in ("/api/analyses/", "/api/analyses/{id}/", "/api/batches/", "/api/batches/{id}/", "/api/auth/token/"):
        assert path in paths
