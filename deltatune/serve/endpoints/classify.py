"""``POST /v1/adapters/{name}/classify``: the class and its probabilities from a classification adapter."""
from __future__ import annotations

from fastapi import Request
from pydantic import BaseModel, Field

from ..api import ServerDep, Texts, endpoint


class ClassResult(BaseModel):
    label: str | int = Field(..., description="the class name, or its index when the adapter carries no names")
    index: int
    probabilities: list[float] = Field(..., description="in class order")
    tokens: int


class Classes(BaseModel):
    adapter: str
    labels: list[str] | None
    results: list[ClassResult]
    note: str | None = Field(None, description="present when the adapter carries no label names")


@endpoint("POST", "/v1/adapters/{name}/classify", label="classify", answer=Classes,
          errors=(400, 404, 410, 413, 422, 429, 504),
          summary="the class and class probabilities (classification adapters)",
          description="Per text: `label` (the class name saved with the adapter, or its index when the adapter "
                      "carries no names), `index`, and `probabilities` in class order. `labels` lists the class "
                      "names, or is null with a `note` when the adapter has none.")
async def classify(name: str, body: Texts, request: Request, server: ServerDep):
    names = server.engine.info(name, "classify").label_names
    results = await server.run(request, server.jobs(name, "classify", server.texts(body)))
    server.counted(name)
    out = {"adapter": name, "labels": names, "results": results}
    if names is None:
        out["note"] = ("this adapter carries no label names (train saves them from the task's labels); "
                       "'label' is the class index")
    return out
