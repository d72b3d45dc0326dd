"""The OpenAPI 3.1 document of the front (served at /openapi.json; docs/openapi.json is the one of
the small 1-shot export at max batch 8, kept equal by a test)."""

from __future__ import annotations

from fssam.serving.kserve import FILE_MIB, Contract


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}


ERRORS = {
    "400": _error("a client mistake: the message names the input"),
    "401": _error("an API key is required and was missing or wrong"),
    "413": _error("the body (or a file) is over the limit this model allows"),
    "415": _error("a compressed body, or a body of another media type"),
    "503": {**_error("the model server is starting, restarting or stopping: retry"),
            "headers": {"Retry-After": {"schema": {"type": "integer"}, "description": "seconds"}}},
}


def _tensor(name: str, shape: list, maximum: int) -> dict:
    return {"type": "object", "additionalProperties": False, "required": ["name", "shape", "datatype"],
            "properties": {"name": {"const": name}, "datatype": {"const": "UINT8"},
                           "shape": {"type": "array", "items": {"type": "integer"}, "minItems": len(shape),
                                     "maxItems": len(shape), "description": f"{shape}, 1 <= B <= {maximum}"},
                           "data": {"type": "array", "description": "row-major values, integers 0..255 (flat or nested)"},
                           "parameters": {"type": "object", "additionalProperties": False,
                                          "properties": {"binary_data_size": {"type": "integer", "minimum": 0}}}}}


def document(contract: Contract, keys: bool = False) -> dict:
    s, k, b = contract.image_size, contract.shots, contract.max_batch
    model = {"name": "name", "in": "path", "required": True, "schema": {"const": "fssam"}}
    files = {"type": "string", "format": "binary"}
    many = files if k == 1 else {"type": "array", "items": files, "minItems": k, "maxItems": k}
    infer_request = {
        "type": "object", "additionalProperties": False, "required": ["inputs"],
        "properties": {
            "id": {"type": "string", "maxLength": 256},
            "parameters": {"type": "object", "additionalProperties": False,
                           "properties": {"binary_data_output": {"type": "boolean"}}},
            "inputs": {"type": "array", "minItems": 3, "maxItems": 3, "items": {"oneOf": [
                _tensor("query", ["B", 3, s, s], b), _tensor("support_images", ["B", k, 3, s, s], b),
                _tensor("support_masks", ["B", k, s, s], b)]}},
            "outputs": {"type": "array", "items": {
                "type": "object", "additionalProperties": False, "required": ["name"],
                "properties": {"name": {"const": "logits"}, "parameters": {
                    "type": "object", "additionalProperties": False, "properties": {"binary_data": {"type": "boolean"}}}}}},
        }}
    ok_json = {"description": "OK", "content": {"application/json": {"schema": {"type": "object"}}}}
    doc = {
        "openapi": "3.1.0",
        "info": {"title": "fssam", "version": "1",
                 "description": f"FSSAM few-shot segmentation behind the fssam front: image size {s}, {k} shot"
                                f"{'s' if k != 1 else ''}, at most {b} episodes per request. Every client mistake "
                                "is a 4xx naming the input; 503 with Retry-After while the model server restarts."},
        "paths": {
            "/v1/segment": {"post": {
                "operationId": "segment", "summary": "Segment a query image given support images and masks (files)",
                "parameters": [{"name": "output", "in": "query", "required": False,
                                "schema": {"enum": ["png", "json", "npy"], "default": "png"}}],
                "requestBody": {"required": True, "content": {"multipart/form-data": {
                    "schema": {"type": "object", "additionalProperties": False,
                               "required": ["query", "support", "support_mask"],
                               "properties": {"query": files, "support": many, "support_mask": many}},
                    "encoding": {"query": {"contentType": "image/png, image/jpeg"}}}}},
                "responses": {"200": {"description": "the mask (0/255 PNG at the query's size), or the logits",
                                      "headers": {"X-FSSAM-Image-Size": {"schema": {"type": "integer"}},
                                                  "X-FSSAM-Weights": {"schema": {"type": "string"}}},
                                      "content": {"image/png": {"schema": files},
                                                  "application/json": {"schema": {"type": "object"}},
                                                  "application/x-npy": {"schema": files}}}, **ERRORS}}},
            "/v2/models/{name}/infer": {"post": {
                "operationId": "infer", "summary": "KServe v2 inference (JSON, or binary tensors)",
                "parameters": [model, {"name": "Inference-Header-Content-Length", "in": "header", "required": False,
                                       "schema": {"type": "integer", "minimum": 1},
                                       "description": "binary tensors: the JSON header's length in bytes"}],
                "requestBody": {"required": True, "content": {
                    "application/json": {"schema": infer_request},
                    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}},
                "responses": {"200": ok_json, **ERRORS}}},
            "/v2/models/{name}": {"get": {"operationId": "model_metadata", "parameters": [model],
                                          "responses": {"200": ok_json, "401": ERRORS["401"]}}},
            "/v2/models/{name}/ready": {"get": {"operationId": "model_ready", "parameters": [model],
                                                "responses": {"200": {"description": "ready"}, "503": ERRORS["503"]}}},
            "/v2/models/{name}/config": {"get": {"operationId": "model_config", "parameters": [model],
                                                 "responses": {"200": ok_json, "401": ERRORS["401"]}}},
            "/v2/models/{name}/stats": {"get": {"operationId": "model_stats", "parameters": [model],
                                                "responses": {"200": ok_json, "401": ERRORS["401"],
                                                              "503": ERRORS["503"]}}},
            "/v2/health/live": {"get": {"operationId": "live", "responses": {"200": {"description": "the front runs"}}}},
            "/v2/health/ready": {"get": {"operationId": "ready", "responses": {
                "200": {"description": "the model server answers"}, "503": ERRORS["503"]}}},
            "/v2": {"get": {"operationId": "server_metadata", "responses": {"200": ok_json, "401": ERRORS["401"]}}},
            "/metrics": {"get": {"operationId": "metrics", "responses": {
                "200": {"description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}},
                "401": ERRORS["401"]}}},
            "/openapi.json": {"get": {"operationId": "openapi", "responses": {"200": ok_json, "401": ERRORS["401"]}}},
        },
        "components": {
            "schemas": {"Error": {"type": "object", "required": ["error"],
                                  "properties": {"error": {"type": "string"}}}},
            "securitySchemes": {"apiKey": {"type": "http", "scheme": "bearer",
                                           "description": "fssam serve --api-key / --api-key-file"}},
        },
        "x-fssam-limits": {"image_size": s, "shots": k, "max_batch": b, "file_mib": FILE_MIB,
                           "binary_body_bytes": contract.binary_body_limit, "json_body_bytes": contract.json_body_limit},
    }
    if keys:
        doc["security"] = [{"apiKey": []}]
        for path in ("/v2/health/live", "/v2/health/ready"):
            doc["paths"][path]["get"]["security"] = []
    return doc
