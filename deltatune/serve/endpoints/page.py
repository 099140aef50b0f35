"""``GET /``: the web page (plain HTML and a little JavaScript; no build step)."""
from fastapi.responses import HTMLResponse

from ..api import endpoint
from ..page import PAGE


@endpoint("GET", "/", label="/", response_class=HTMLResponse, include_in_schema=False)
async def page():
    return HTMLResponse(PAGE)
