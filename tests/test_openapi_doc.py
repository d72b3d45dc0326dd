"""docs/openapi.json: the front's OpenAPI document of the small 1-shot export at max batch 8, kept in
step with fssam.serving.openapi, and a valid OpenAPI 3.1 document."""

import json
import os

import pytest

from fssam.serving.kserve import Contract
from fssam.serving.openapi import document

DOC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "docs", "openapi.json")
SMALL_1SHOT = Contract(512, 1, 8)
OPERATIONS = {
    "POST /v1/segment", "POST /v2/models/{name}/infer", "GET /v2/models/{name}", "GET /v2/models/{name}/ready",
    "GET /v2/models/{name}/config", "GET /v2/models/{name}/stats", "GET /v2/health/live", "GET /v2/health/ready",
    "GET /v2", "GET /metrics", "GET /openapi.json",
}


def _regenerate() -> str:
    return json.dumps(document(SMALL_1SHOT), indent=2) + "\n"


def test_docs_openapi_json_is_the_generated_document():
    with open(DOC, encoding="utf-8") as handle:
        text = handle.read()
    assert text == _regenerate(), (
        "docs/openapi.json is out of step with fssam/serving/openapi.py: regenerate it with\n"
        "  python -c 'import json; from fssam.serving.kserve import Contract; "
        "from fssam.serving.openapi import document; "
        "open(\"docs/openapi.json\", \"w\").write(json.dumps(document(Contract(512, 1, 8)), indent=2) + \"\\n\")'")


@pytest.mark.parametrize("keys", [False, True], ids=["open", "api-keys"])
def test_openapi_document_is_valid_openapi(keys):
    openapi = pytest.importorskip("schemathesis.openapi", reason="schemathesis is not installed: cannot check the "
                                                                 "document against the OpenAPI meta-schema")
    with open(DOC, encoding="utf-8") as handle:
        raw = json.load(handle) if not keys else document(SMALL_1SHOT, keys=True)
    schema = openapi.from_dict(raw)
    schema.validate()  # the OpenAPI 3.1 meta-schema; raises naming the first violation
    results = list(schema.get_all_operations())
    labels = set()
    for result in results:
        operation = result.ok()  # raises the parse error of an operation schemathesis cannot read
        labels.add(operation.label)
    assert labels == OPERATIONS
    assert len(results) == len(OPERATIONS)
    limits = raw["x-fssam-limits"]
    assert (limits["image_size"], limits["shots"], limits["max_batch"]) == (512, 1, 8)
    assert limits["binary_body_bytes"] == SMALL_1SHOT.binary_body_limit
