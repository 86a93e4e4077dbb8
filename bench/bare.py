"""The logging round's baseline: a bare FastAPI route on the same uvicorn, no access log."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}
