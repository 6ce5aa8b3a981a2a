"""apierror.py - the one error type every layer raises and the HTTP edge turns into JSON.

An ApiError carries an HTTP status, a stable machine code (`invalid_file_id`,
`chunk_conflict`, ...) and a human message. httpapi.py's dispatcher is the single place that
turns it into the envelope of SPEC section 1:
    {"success": false, "error": {"code": "...", "message": "..."}}
Modules raise it (or a subclass of it); they never write error responses themselves.
"""
from __future__ import annotations


class ApiError(Exception):
    def __init__(self, status, code, message, headers=None):
        Exception.__init__(self, message)
        self.status = int(status)
        self.code = code
        self.message = message
        self.headers = dict(headers or {})   # extra response headers (Allow, Retry-After...)
