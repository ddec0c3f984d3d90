"""The web dashboard (SPEC 14, ``sqlbus dashboard``): a thin Starlette layer over the public
library API. Needs the extra ``sqlbus[web]``; :func:`create_app` makes the ASGI app."""
