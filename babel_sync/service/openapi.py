"""The OpenAPI 3 document of the service's API (served at ``/api/v1/openapi.json``)."""

from __future__ import annotations

from typing import Any

from .jobs import MODES, STATES, VERIFY


def _job_spec() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["source", "destination"],
        "additionalProperties": False,
        "properties": {
            "source": {"type": "string", "description": "store URL"},
            "destination": {"type": "string", "description": "store URL"},
            "mode": {"type": "string", "enum": list(MODES), "default": "sync"},
            "delete": {"type": "boolean", "default": False},
            "verify": {"type": "string", "enum": list(VERIFY), "default": "sample"},
            "transfers": {"type": "integer", "minimum": 1, "maximum": 1024, "default": 16},
            "bwlimit": {"type": ["string", "null"], "description": "bytes per second, e.g. 50M"},
            "part_size": {
                "type": ["string", "null"],
                "description": "multipart part size, e.g. 64MiB (>= 5 MiB)",
            },
            "include": {"type": "array", "items": {"type": "string"}},
            "exclude": {"type": "array", "items": {"type": "string"}},
            "every_minutes": {"type": ["number", "null"], "exclusiveMinimum": 0},
            "daily_at": {"type": ["string", "null"], "pattern": "^([01][0-9]|2[0-3]):[0-5][0-9]$"},
            "name": {"type": "string", "maxLength": 200},
            "engine": {"type": "string", "enum": ["local", "ray"], "default": "local"},
            "ray_address": {"type": ["string", "null"], "description": "HOST:PORT, or auto"},
        },
    }


def _job() -> dict[str, Any]:
    return {
        "type": "object",
        "required": ["id", "spec", "state", "progress"],
        "properties": {
            "id": {"type": "string"},
            "spec": {"$ref": "#/components/schemas/JobSpec"},
            "state": {"type": "string", "enum": list(STATES)},
            "created": {"type": "number"},
            "started": {"type": ["number", "null"]},
            "finished": {"type": ["number", "null"]},
            "runs": {"type": "integer"},
            "progress": {"type": "object", "description": "the engine's counters and elapsed s"},
            "history": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
            "report": {"type": ["object", "null"], "description": "the CLI's --json report"},
            "error": {"type": "string"},
            "rate": {"type": "number"},
            "eta_s": {"type": ["number", "null"]},
            "percent": {"type": ["number", "null"]},
            "next_run": {"type": ["number", "null"]},
        },
    }


def document() -> dict[str, Any]:
    error = {
        "description": "error",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    job = {
        "description": "the job",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Job"}}},
    }
    job_id = {"name": "id", "in": "path", "required": True, "schema": {"type": "string"}}
    control = {
        "parameters": [job_id],
        "post": {"responses": {"200": job, "400": error, "401": error, "404": error}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "babel-sync service", "version": "1"},
        "security": [{"bearer": []}],
        "paths": {
            "/api/v1/jobs": {
                "get": {
                    "summary": "list jobs",
                    "parameters": [
                        {
                            "name": "state",
                            "in": "query",
                            "schema": {"type": "string", "enum": list(STATES)},
                        }
                    ],
                    "responses": {"200": {"description": "jobs"}, "401": error},
                },
                "post": {
                    "summary": "submit a job",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {"schema": {"$ref": "#/components/schemas/JobSpec"}}
                        },
                    },
                    "responses": {"201": job, "400": error, "401": error},
                },
            },
            "/api/v1/jobs/{id}": {
                "parameters": [job_id],
                "get": {
                    "summary": "one job",
                    "responses": {"200": job, "401": error, "404": error},
                },
                "delete": {
                    "summary": "forget a job",
                    "responses": {
                        "200": {"description": "deleted"},
                        "400": error,
                        "401": error,
                        "404": error,
                    },
                },
            },
            "/api/v1/jobs/{id}/pause": control,
            "/api/v1/jobs/{id}/resume": control,
            "/api/v1/jobs/{id}/cancel": control,
            "/api/v1/events": {
                "get": {
                    "summary": "server-sent events: one JSON object per job change",
                    "parameters": [{"name": "job", "in": "query", "schema": {"type": "string"}}],
                    "responses": {"200": {"description": "text/event-stream"}, "401": error},
                }
            },
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "JobSpec": _job_spec(),
                "Job": _job(),
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {"error": {"type": "string"}, "field": {"type": "string"}},
                },
            },
        },
    }
