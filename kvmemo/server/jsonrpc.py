"""The JSON-RPC 2.0 codec of the WebSocket port, sans-IO.

Design
------
Problem: a WebSocket text message is one JSON-RPC 2.0 request or a batch of
them (PROTOCOL.md, "Messages"). The server needs, for each message, the calls
to run and the error responses for everything that could not become a call,
and later it needs to turn results and errors back into text. Bad input of any
kind must become an error response, never an exception: the session outlives
every bad message.

Approach: :func:`decode_message` turns one text into a :class:`Decoded` -- the
valid :class:`Call` s in batch order plus the already formed error
:class:`Response` s -- and :func:`encode` turns responses into the text of one
message. Like h11 and wsproto this module does no I/O: it imports neither trio
nor sockets nor the engine; the server glues it to the socket and the command
table. It never checks whether a method exists; the command table does that.

Reading of JSON-RPC 2.0 (https://www.jsonrpc.org/specification)
---------------------------------------------------------------
Validation runs in two layers.

1. *Is it a JSON-RPC 2.0 Request object?* An object whose ``jsonrpc`` is the
   string ``"2.0"``, whose ``method`` is a string, whose ``id``, when present,
   is an integer (not a boolean), a string or ``null``, and whose ``params``,
   when present, is an array or an object. Something that fails this is not a
   Request, hence not a Notification either, so it is answered with
   ``-32600`` even when it has no ``id`` member -- exactly as in the
   specification's own examples (``{"jsonrpc": "2.0", "method": 1, "params":
   "bar"}`` and ``[1, 2, 3]`` are answered with ``"id": null``). The error
   carries the request's ``id`` when that ``id`` was itself valid, else
   ``null``.
2. *Are its parameters acceptable to KVMemo?* ``params`` must be a positional
   array whose elements are strings, integers or finite numbers, and every
   string (the method included) must be encodable as UTF-8 (a JSON ``\\ud800``
   escape gives a lone surrogate, which cannot be). A failure here is
   ``-32600`` (PROTOCOL.md, "Errors") for a request with an ``id``. For a
   Notification (a valid Request object with no ``id`` member) it is *not*
   answered: the specification says the server MUST NOT reply to a
   Notification, and the request is simply not executed.

Other points of the reading:

- ``"id": null`` is a request, not a Notification; it is answered with
  ``"id": null``. An ``id`` that is a number with a fraction (``1.5``) is not
  accepted (PROTOCOL.md allows integers and strings only). A string ``id``
  that cannot be encoded as UTF-8 could not be echoed, so it counts as an
  invalid ``id``.
- Members other than ``jsonrpc``, ``id``, ``method`` and ``params`` are
  ignored; for a repeated member the last one counts (Python's ``json``).
- ``NaN``, ``Infinity`` and ``-Infinity`` are not JSON: ``-32700``. A number
  too large for a float (``1e400``) parses as infinity and is refused as a
  parameter (``-32600``). Integers of any size are accepted as parameters and
  passed on as their decimal digits; the command reports ``NOT_INTEGER`` if it
  overflows. Integers too long for Python's ``int`` conversion limit are kept
  as their digits, never converted, and are invalid as an ``id``.
- JSON nested too deeply for the parser is answered with ``-32700``.
- A message that is neither an object nor an array, an empty batch, and a
  batch longer than ``max_batch`` (``-32004 TOO_LARGE``, no call runs; its
  ``data`` has ``length``, the batch's, and ``limit``, ``max_batch``, so that
  a client with several batches unanswered knows which one it answers) are
  each answered with one error *object*, not an array, as the specification
  answers ``[]``; :attr:`Decoded.is_batch` is ``False`` for them.
- A batch's responses hold one response for every item except valid
  Notifications; a batch with no such item is answered with nothing at all.
- Method names pass through unchanged (they are case-sensitive).

Fast paths
----------
Most messages are a valid request object, or an array of them, with string
and integer parameters, and most results are a bulk string, a simple
string, an integer or nil. Both directions have a fast path for these that
gives exactly what the general code gives (the tests compare the two on
generated requests and results):

- :func:`decode_message` parses with a prebuilt decoder (no Python hook per
  integer; any failure re-parses the general way, which words the error),
  and takes each item of the plain shape straight to a :class:`Call`,
  checking only what the plain shape needs; any other item goes through the
  general validation below.
- :func:`response_text` writes a success response as text directly, and
  :func:`encode_texts` joins the texts of one message's responses, as
  :func:`encode` would have written them from :class:`Response` objects.

Results
-------
:func:`to_json_result` maps command results to JSON as the table of
PROTOCOL.md ("Results") says. Bulk strings are ``bytes``; they are sent as
JSON strings decoded as UTF-8 with ``errors="replace"``, so a value that is
not valid UTF-8 comes back with U+FFFD replacement characters in place of its
bad bytes (the stored value itself is untouched).

Invariant: every text :func:`encode` returns is valid JSON (no ``NaN``) and
can be encoded as UTF-8, so it can always be sent as a WebSocket text message.
"""

from __future__ import annotations

import json
import json.encoder
import math
import re
from collections.abc import Callable, Sequence
from typing import Final, TypeAlias

import attrs

from kvmemo.errors import KVMemoError, TooLargeError

__all__ = [
    "INVALID_REQUEST_CODE",
    "INVALID_REQUEST_KIND",
    "PARSE_ERROR_CODE",
    "PARSE_ERROR_KIND",
    "Call",
    "Decoded",
    "JSONValue",
    "RequestId",
    "Response",
    "binary_message_response",
    "decode_message",
    "encode",
    "encode_texts",
    "error_response",
    "error_response_for",
    "error_text",
    "notification_text",
    "response_text",
    "result_response",
    "text_of",
    "to_json_result",
    "unknown_method_message",
]

JSONValue: TypeAlias = "None | bool | int | float | str | list[JSONValue] | dict[str, JSONValue]"
"""A value :func:`json.dumps` can write."""

RequestId: TypeAlias = "int | str | None"
"""A JSON-RPC request id as KVMemo accepts it (PROTOCOL.md: integer or string; or null)."""

# The two errors that belong to the JSON-RPC layer itself. kvmemo.errors has no
# exception classes for them: no command can raise them, only this codec.
PARSE_ERROR_CODE = -32700
PARSE_ERROR_KIND = "PARSE"
INVALID_REQUEST_CODE = -32600
INVALID_REQUEST_KIND = "INVALID_REQUEST"

_JSONRPC_VERSION = "2.0"
_COMPACT = (",", ":")


@attrs.frozen
class Call:
    """One valid request of a message, ready for the command table.

    Attributes:
        id: the request's id; ``None`` both for ``"id": null`` and for a
            Notification (see ``notification``).
        method: the method name, unchanged (case-sensitive).
        args: the positional parameters as bytes: strings UTF-8 encoded,
            integers as ASCII decimal digits, finite floats as ``repr()``.
        notification: ``True`` when the request had no ``id`` member; the
            server runs it and sends nothing back, not even an error.
        index: the position of the request in its batch (0 for a single request).
        calls: for ``transaction`` (version 1.2), its calls as (method, args),
            each checked as a request's params are; ``args`` is then empty.
    """

    id: RequestId
    method: str
    args: tuple[bytes, ...]
    notification: bool
    index: int
    calls: tuple[tuple[str, tuple[bytes, ...]], ...] | None = None


@attrs.frozen
class Response:
    """One JSON-RPC response object, JSON-ready.

    Attributes:
        payload: the response object, e.g. ``{"jsonrpc": "2.0", "id": 7,
            "result": "OK"}``; every value in it can be written by ``json.dumps``.
    """

    payload: dict[str, JSONValue]

    @property
    def id(self) -> RequestId:
        """The id this response answers (``None`` for ``"id": null``)."""
        value = self.payload["id"]
        assert value is None or isinstance(value, int | str)
        return value

    @property
    def is_error(self) -> bool:
        """Whether this is an error response."""
        return "error" in self.payload


@attrs.frozen
class Decoded:
    """What one WebSocket text message asks for.

    Attributes:
        calls: the valid requests to execute, in batch order.
        errors: the responses for the items that failed validation, already
            formed; send them together with the calls' responses.
        is_batch: whether the answer is a JSON array (pass it to
            :func:`encode`). ``False`` for a single request and for a message
            answered with one error object (not JSON, not an object or an
            array, empty batch, batch too long).
    """

    calls: list[Call]
    errors: list[Response]
    is_batch: bool


# ----------------------------------------------------------------------------
# Encoding


def to_json_result(value: object) -> JSONValue:
    """Convert a command result to the JSON value sent as ``result``.

    Args:
        value: ``bytes`` (a bulk string; also ``bytearray``/``memoryview``),
            ``str`` (a simple string), ``int``, ``bool``, ``None`` (nil), a
            finite ``float``, a ``list``/``tuple`` of results, or a ``dict``
            with ``str`` or ``bytes`` keys (``info``).

    Returns:
        The JSON-ready value. Bytes are decoded as UTF-8 with
        ``errors="replace"``: invalid sequences become U+FFFD.

    Raises:
        TypeError: for any other type (a bug of the command that returned it).
        ValueError: for a NaN or infinite float, which JSON cannot hold.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError(f"cannot send non-finite float {value!r} as JSON")
        return value
    if isinstance(value, list | tuple):
        return [to_json_result(item) for item in value]
    if isinstance(value, dict):
        converted: dict[str, JSONValue] = {}
        for key, item in value.items():
            if isinstance(key, bytes):
                key = key.decode("utf-8", errors="replace")
            elif not isinstance(key, str):
                raise TypeError(f"cannot send a dict key of type {type(key).__name__} as JSON")
            converted[key] = to_json_result(item)
        return converted
    raise TypeError(f"cannot send a result of type {type(value).__name__} as JSON")


def result_response(id: RequestId, result: object) -> Response:
    """The success response to request ``id``.

    Args:
        id: the id of the request answered.
        result: the command's result, converted with :func:`to_json_result`.

    Raises:
        TypeError, ValueError: as :func:`to_json_result`.
    """
    return Response({"jsonrpc": _JSONRPC_VERSION, "id": id, "result": to_json_result(result)})


def error_response_for(
    id: RequestId, code: int, kind: str, message: str, **data: object
) -> Response:
    """An error response built from its parts.

    Args:
        id: the id of the request answered (``None`` when it could not be read).
        code: the JSON-RPC error code.
        kind: the protocol's error kind, sent as ``error.data.kind``.
        message: the text for people.
        **data: more fields of ``error.data`` (converted with :func:`to_json_result`).

    Raises:
        TypeError, ValueError: when a ``data`` value cannot be sent as JSON.
    """
    error_data: dict[str, JSONValue] = {"kind": kind}
    for key, value in data.items():
        error_data[key] = to_json_result(value)
    return Response(
        {
            "jsonrpc": _JSONRPC_VERSION,
            "id": id,
            "error": {"code": code, "message": message, "data": error_data},
        }
    )


def error_object(error: KVMemoError) -> dict[str, JSONValue]:
    """The ``error`` member of :func:`error_response`, alone (a transaction's failed call).

    Raises:
        TypeError, ValueError: as :func:`error_response`.
    """
    body = error_response(None, error).payload["error"]
    assert isinstance(body, dict)
    return body


def error_response(id: RequestId, error: KVMemoError) -> Response:
    """The error response reporting ``error`` to request ``id``.

    ``error.data`` becomes ``error.data`` on the wire, with ``kind`` always
    ``error.kind`` (a ``"kind"`` entry in ``error.data`` cannot override it).

    Raises:
        TypeError, ValueError: when a value of ``error.data`` cannot be sent as JSON.
    """
    data = {key: value for key, value in error.data.items() if key != "kind"}
    return error_response_for(id, error.code, error.kind, error.message, **data)


def unknown_method_message(method: str, is_method: Callable[[str], bool], where: str = "") -> str:
    """The message of ``-32601 UNKNOWN_METHOD`` for ``method``.

    Methods are lower case and case-sensitive on this port; when the name
    in lower case is a method (``is_method``), the message says so:
    ``unknown method 'GET' (methods are lower case: 'get')``. The error's
    code and kind stay those of any unknown method.

    Args:
        method: the name as sent.
        is_method: whether a name is a method where this one was sent.
        where: words after the name (``" in a transaction"``).
    """
    lower = method.lower()
    hint = f" (methods are lower case: '{lower}')" if lower != method and is_method(lower) else ""
    return f"unknown method '{method}'{where}{hint}"


def binary_message_response() -> Response:
    """The answer to a binary WebSocket message: ``-32600``, ``id`` null.

    The session stays open (PROTOCOL.md, "Messages").
    """
    return _invalid(
        None,
        "binary messages are reserved in protocol version 1; "
        "send JSON-RPC requests as text messages",
    )


def encode(responses: Sequence[Response], *, is_batch: bool) -> str | None:
    """The text of the message answering one request message.

    Args:
        responses: every response to send for the message, in any order.
        is_batch: :attr:`Decoded.is_batch` of the message answered.

    Returns:
        For a single request its response object; for a batch the array of
        its responses; ``None`` when there is nothing to send (Notifications
        only). Compact JSON, non-ASCII characters written as themselves --
        unless a string holds a lone surrogate (it could not be UTF-8 encoded),
        in which case the whole text is written with ``\\u`` escapes instead.

    Raises:
        ValueError: when ``is_batch`` is false and there is more than one response.
    """
    if not responses:
        return None
    document: JSONValue
    if is_batch:
        document = [response.payload for response in responses]
    elif len(responses) == 1:
        document = responses[0].payload
    else:
        raise ValueError(f"a single request has at most one response, got {len(responses)}")
    text = json.dumps(document, separators=_COMPACT, ensure_ascii=False, allow_nan=False)
    if not text.isascii() and _utf8(text) is None:
        text = json.dumps(document, separators=_COMPACT, ensure_ascii=True, allow_nan=False)
    return text


# json.dumps(str, ensure_ascii=False) for one string: the quoted, escaped text.
_quote = json.encoder.encode_basestring


def text_of(response: Response) -> str:
    """The compact JSON text of one response, as :func:`encode` writes it in a message.

    Non-ASCII characters are written as themselves (see :func:`encode_texts`).
    """
    return json.dumps(response.payload, separators=_COMPACT, ensure_ascii=False, allow_nan=False)


def _id_text(id: RequestId) -> str:
    if type(id) is int:
        return int.__repr__(id)
    if type(id) is str:
        return _quote(id)
    if id is None:
        return "null"
    raise TypeError(f"a request id must be an int, a str or None, got {type(id).__name__}")


def response_text(id: RequestId, result: object) -> str:
    """The text of :func:`result_response` ``(id, result)``, written directly.

    Equal to :func:`text_of` of that response; bulk strings, simple strings,
    integers, booleans and nil are written without building the response
    (other results go through :func:`to_json_result` and ``json.dumps``).

    Raises:
        TypeError, ValueError: as :func:`to_json_result`.
    """
    if type(result) is bytes:
        value = _quote(result.decode("utf-8", errors="replace"))
    elif result is None:
        value = "null"
    elif type(result) is str:
        value = _quote(result)
    elif type(result) is int:
        value = int.__repr__(result)
    elif type(result) is bool:
        value = "true" if result else "false"
    else:
        value = json.dumps(
            to_json_result(result), separators=_COMPACT, ensure_ascii=False, allow_nan=False
        )
    return '{"jsonrpc":"2.0","id":' + _id_text(id) + ',"result":' + value + "}"


def notification_text(method: str, params: Sequence[bytes]) -> str:
    """The text of a notification the server sends (version 1.4 pushes: ``message``, ``pmessage``).

    ``{"jsonrpc":"2.0","method":METHOD,"params":[...]}``, compact: a JSON-RPC
    request object without ``id``, which no response has (a response always
    has an ``id`` member), so a client tells the two apart by shape. Each
    param is a bulk string, written exactly as :func:`response_text` writes a
    bulk-string result (UTF-8 decoded with ``errors="replace"``); the text
    therefore never holds a lone surrogate and can always be sent.
    """
    quote = _quote
    body = ",".join([quote(param.decode("utf-8", errors="replace")) for param in params])
    return '{"jsonrpc":"2.0","method":' + quote(method) + ',"params":[' + body + "]}"


def error_text(id: RequestId, error: KVMemoError) -> str:
    """The text of :func:`error_response` ``(id, error)``.

    Raises:
        TypeError, ValueError: as :func:`error_response`.
    """
    return text_of(error_response(id, error))


# Characters json.dumps(..., ensure_ascii=True) writes as \u escapes that the
# ensure_ascii=False text holds as themselves: everything from DEL up. (The
# control characters below space are escaped the same way by both.)
_NON_ASCII: Final = re.compile(r"[\x7f-\U0010ffff]")


def _escape(match: re.Match[str]) -> str:
    code = ord(match.group())
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000
    return f"\\u{0xD800 | (code >> 10):04x}\\u{0xDC00 | (code & 0x3FF):04x}"


def encode_texts(texts: Sequence[str], *, is_batch: bool) -> str | None:
    """The text of one answer message from the texts of its responses.

    ``encode_texts([text_of(r) for r in responses], is_batch=b)`` equals
    ``encode(responses, is_batch=b)``, whatever the responses, including the
    rule for lone surrogates (the whole text is then written with ``\\u``
    escapes).

    Args:
        texts: the texts of every response to send for the message, as
            :func:`text_of`, :func:`response_text` or :func:`error_text` write them.
        is_batch: :attr:`Decoded.is_batch` of the message answered.

    Returns:
        The message text, or ``None`` when there is nothing to send.

    Raises:
        ValueError: when ``is_batch`` is false and there is more than one text.
    """
    if not texts:
        return None
    if is_batch:
        text = "[" + ",".join(texts) + "]"
    elif len(texts) == 1:
        text = texts[0]
    else:
        raise ValueError(f"a single request has at most one response, got {len(texts)}")
    if not text.isascii() and _utf8(text) is None:
        # JSON's structure is ASCII: every other character is inside a string,
        # where ensure_ascii=True writes it as a \u escape (a pair above U+FFFF).
        text = _NON_ASCII.sub(_escape, text)
    return text


# ----------------------------------------------------------------------------
# Decoding


def decode_message(text: str, *, max_batch: int) -> Decoded:
    """Validate one WebSocket text message and split it into calls and errors.

    Never raises for any ``text``: every problem becomes an error response
    (see the module docstring for the rules and their reading of JSON-RPC 2.0).

    Args:
        text: the message.
        max_batch: the longest batch accepted; a longer one is refused whole
            with one ``-32004 TOO_LARGE`` error and no call.

    Returns:
        The calls in batch order, the error responses, and whether the answer
        is an array.

    Raises:
        ValueError: if ``max_batch`` is below 1 (a bug of the caller).
    """
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    try:
        # Fast: no Python call per integer. Whatever fails here (an integer
        # too long to convert included) is parsed again below, which keeps
        # long integers as digits and words every error.
        document = _FAST_DECODER.decode(text)
    except (ValueError, RecursionError):
        try:
            document = json.loads(text, parse_int=_parse_int, parse_constant=_refuse_constant)
        except RecursionError:
            return _single_error(_parse_error("Parse error: JSON nested too deeply"))
        except ValueError as exc:  # json.JSONDecodeError and _refuse_constant
            return _single_error(_parse_error(f"Parse error: {exc}"))

    if isinstance(document, dict):
        return _decode_items([document], is_batch=False, max_batch=max_batch)
    if not isinstance(document, list):
        return _single_error(
            _invalid(
                None,
                f"a message must be a request object or a batch array, got {_json_type(document)}",
            )
        )
    if not document:
        return _single_error(_invalid(None, "empty batch"))
    if len(document) > max_batch:
        # data.length tells a client which of its unanswered batches this
        # error (id null) answers; data.limit how to split the next ones.
        too_large = TooLargeError(
            f"batch of {len(document)} requests is over the limit of {max_batch}",
            length=len(document),
            limit=max_batch,
        )
        return _single_error(error_response(None, too_large))
    return _decode_items(document, is_batch=True, max_batch=max_batch)


@attrs.frozen
class _LongInteger:
    """A JSON integer too long for Python's int conversion limit, kept as digits."""

    digits: str


def _parse_int(digits: str) -> int | _LongInteger:
    try:
        return int(digits)
    except ValueError:  # over sys.get_int_max_str_digits(); never converted
        return _LongInteger(digits)


class _NotJSONError(ValueError):
    pass


def _refuse_constant(name: str) -> float:
    raise _NotJSONError(f"{name} is not valid JSON")


_FAST_DECODER: Final = json.JSONDecoder(parse_constant=_refuse_constant)


def _single_error(response: Response) -> Decoded:
    return Decoded(calls=[], errors=[response], is_batch=False)


def _parse_error(message: str) -> Response:
    return error_response_for(None, PARSE_ERROR_CODE, PARSE_ERROR_KIND, message)


def _invalid(id: RequestId, message: str) -> Response:
    return error_response_for(id, INVALID_REQUEST_CODE, INVALID_REQUEST_KIND, message)


def _decode_items(items: list[object], *, is_batch: bool, max_batch: int) -> Decoded:
    calls: list[Call] = []
    errors: list[Response] = []
    for index, item in enumerate(items):
        outcome: Call | Response | None = _plain_call(item, index)
        if outcome is None:
            outcome = _decode_item(item, index, max_batch)
        if isinstance(outcome, Call):
            calls.append(outcome)
        elif outcome is not None:
            errors.append(outcome)
    return Decoded(calls=calls, errors=errors, is_batch=is_batch)


def _plain_call(item: object, index: int) -> Call | None:
    """The Call for a request of the plain shape, else None (then :func:`_decode_item` decides).

    The plain shape: an object with ``"jsonrpc": "2.0"``, an integer or ASCII
    string ``id``, an ASCII string ``method`` and an array ``params`` of
    strings and integers. For it :func:`_decode_item` gives this same Call:
    every check it makes passes (ASCII text is valid UTF-8; a string that is
    not ASCII is encoded, and a lone surrogate sends the item to it).
    """
    if type(item) is not dict:
        return None
    try:
        request_id = item["id"]
        method = item["method"]
        params = item["params"]
        version = item["jsonrpc"]
    except KeyError:
        return None
    if version != "2.0" or type(method) is not str or type(params) is not list:
        return None
    id_kind = type(request_id)
    if not (id_kind is int or (id_kind is str and request_id.isascii())):
        return None
    if not method.isascii() or method == TRANSACTION:  # its params are calls
        return None
    args: list[bytes] = []
    for param in params:
        kind = type(param)
        if kind is str:
            try:
                args.append(param.encode())
            except UnicodeEncodeError:  # a lone surrogate: refused by _decode_item
                return None
        elif kind is int:
            args.append(b"%d" % param)
        else:
            return None
    return Call(request_id, method, tuple(args), False, index)


def _decode_item(item: object, index: int, max_batch: int) -> Call | Response | None:
    """One request object: a Call, an error Response, or None (dropped Notification)."""
    # Layer 1: is it a JSON-RPC 2.0 Request object? Failures are always answered.
    if not isinstance(item, dict):
        return _invalid(None, f"a request must be a JSON object, got {_json_type(item)}")
    notification = "id" not in item
    request_id: RequestId = None
    if not notification:
        raw_id = item["id"]
        if not _is_valid_id(raw_id):
            return _invalid(
                None, f"'id' must be an integer, a string or null, got {_json_type(raw_id)}"
            )
        request_id = raw_id
    version = item.get("jsonrpc")
    if not (isinstance(version, str) and version == _JSONRPC_VERSION):
        return _invalid(request_id, "'jsonrpc' must be \"2.0\"")
    method = item.get("method")
    if not isinstance(method, str):
        return _invalid(request_id, f"'method' must be a string, got {_json_type(method)}")
    params = item.get("params", [])
    if not isinstance(params, list | dict):
        return _invalid(request_id, f"'params' must be an array, got {_json_type(params)}")

    # Layer 2: KVMemo's own rules. Failures are answered unless it is a Notification.
    if method == TRANSACTION and isinstance(params, list):
        if len(params) > max_batch:  # refused on its length alone, as a batch is
            too_large = TooLargeError(
                f"a transaction of {len(params)} calls is over the limit of {max_batch}"
            )
            return None if notification else error_response(request_id, too_large)
        calls = _transaction_calls(params)
        if isinstance(calls, str):
            return None if notification else _invalid(request_id, calls)
        return Call(request_id, method, (), notification, index, calls)
    args = _kvmemo_args(method, params)
    if isinstance(args, str):
        return None if notification else _invalid(request_id, args)
    return Call(id=request_id, method=method, args=args, notification=notification, index=index)


TRANSACTION = "transaction"
"""The method whose params are calls (version 1.2), not scalars."""


def _transaction_calls(
    params: list[object],
) -> tuple[tuple[str, tuple[bytes, ...]], ...] | str:
    """The calls of a ``transaction``, or the message saying why the request is refused."""
    calls = []
    for position, call in enumerate(params):
        if not isinstance(call, list) or not call or not isinstance(call[0], str):
            return f"params[{position}] must be an array [method, param, ...]"
        args = _kvmemo_args(call[0], call[1:])
        if isinstance(args, str):
            return f"params[{position}]: {args}"
        calls.append((call[0], args))
    return tuple(calls)


def _kvmemo_args(method: str, params: list[object] | dict[str, object]) -> tuple[bytes, ...] | str:
    """The params converted to args, or the message saying why the request is refused."""
    if _utf8(method) is None:
        return "'method' is not valid Unicode (lone surrogate)"
    if isinstance(params, dict):
        return "'params' must be a positional array, not an object"
    args: list[bytes] = []
    for position, param in enumerate(params):
        arg = _param_bytes(param)
        if isinstance(arg, str):
            return f"params[{position}] {arg}"
        args.append(arg)
    return tuple(args)


def _param_bytes(param: object) -> bytes | str:
    """One parameter as bytes, or the reason (a message tail) it is refused."""
    if isinstance(param, str):
        encoded = _utf8(param)
        if encoded is None:
            return "is not valid Unicode (lone surrogate)"
        return encoded
    if isinstance(param, bool):  # before int: bool is an int subclass
        return "must be a string or a number, got boolean"
    if isinstance(param, int):
        return str(param).encode("ascii")
    if isinstance(param, _LongInteger):
        return param.digits.encode("ascii")
    if isinstance(param, float):
        if not math.isfinite(param):
            return "is a number out of range"
        return repr(param).encode("ascii")
    return f"must be a string or a number, got {_json_type(param)}"


def _is_valid_id(value: object) -> bool:
    if value is None or (isinstance(value, int) and not isinstance(value, bool)):
        return True
    return isinstance(value, str) and _utf8(value) is not None


def _utf8(text: str) -> bytes | None:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError:
        return None


def _json_type(value: object) -> str:
    """The JSON name of the type of a parsed value, for messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, _LongInteger):
        return f"integer of {len(value.digits.lstrip('-'))} digits"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "array"
    return "object"
