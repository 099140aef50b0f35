"""The server's endpoints: one small module per endpoint (or per resource), each handler registered with
``api.endpoint``. Importing the package registers them all; ``create_app`` reads ``api.ENDPOINTS``.

Adding an endpoint is one module here: its request and answer schemas, its handler, one ``@endpoint``.
"""
import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
