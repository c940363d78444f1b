"""Tests of the sans-IO JSON-RPC codec of the WebSocket port (PROTOCOL.md, "Messages")."""

from __future__ import annotations

import json
import math
from typing import Any
from unittest import mock

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kvmemo import errors
from kvmemo.server import jsonrpc
from kvmemo.server.jsonrpc import (
    INVALID_REQUEST_CODE,
    INVALID_REQUEST_KIND,
    PARSE_ERROR_CODE,
    PARSE_ERROR_KIND,
    Call,
    Decoded,
    Response,
    binary_message_response,
    decode_message,
    encode,
    encode_texts,
    error_response,
    error_response_for,
    error_text,
    response_text,
    result_response,
    text_of,
    to_json_result,
)

MAX_BATCH = 16
LONE_SURROGATE = "\ud800"


def decode(document: Any, *, max_batch: int = MAX_BATCH) -> Decoded:
    """Decode the JSON text of ``document`` (lone surrogates survive as ``\\u`` escapes)."""
    return decode_message(json.dumps(document), max_batch=max_batch)


def request(**members: Any) -> dict[str, Any]:
    return {"jsonrpc": "2.0", **members}


def only_error(decoded: Decoded) -> dict[str, Any]:
    """The single error of a message answered by one error object."""
    assert decoded.calls == []
    assert len(decoded.errors) == 1
    payload = decoded.errors[0].payload
    assert payload["jsonrpc"] == "2.0"
    assert set(payload) == {"jsonrpc", "id", "error"}
    return payload


def assert_error(payload: dict[str, Any], *, id: Any, code: int, kind: str) -> None:
    assert payload["id"] == id
    assert type(payload["id"]) is type(id)
    assert payload["error"]["code"] == code
    assert payload["error"]["data"]["kind"] == kind
    assert isinstance(payload["error"]["message"], str)
    assert payload["error"]["message"]


def answer(decoded: Decoded) -> str | None:
    """Encode what the server would send: the errors plus a result for each non-notification."""
    responses = list(decoded.errors)
    responses += [result_response(call.id, "OK") for call in decoded.calls if not call.notification]
    return encode(responses, is_batch=decoded.is_batch)


# ----------------------------------------------------------------------------
# Messages answered with a single error object


@pytest.mark.parametrize(
    "text",
    [
        "",
        "   ",
        "{",
        "[1,]",
        "{'jsonrpc': '2.0'}",
        '{"jsonrpc": "2.0"} trailing',
        "NaN",
        "Infinity",
        "-Infinity",
        '[{"jsonrpc": "2.0", "id": 1, "method": "incrbyfloat", "params": ["k", NaN]}]',
        "\ufeff{}",
        "[" * 100_000,
        '{"a":' * 100_000,
    ],
)
def test_text_that_is_not_json_is_a_parse_error_with_id_null(text: str) -> None:
    decoded = decode_message(text, max_batch=MAX_BATCH)
    assert not decoded.is_batch
    payload = only_error(decoded)
    assert_error(payload, id=None, code=PARSE_ERROR_CODE, kind=PARSE_ERROR_KIND)
    assert PARSE_ERROR_CODE == -32700
    assert PARSE_ERROR_KIND == "PARSE"


@pytest.mark.parametrize("text", ["1", "-2.5", '"get"', "null", "true", "false", "9" * 5000])
def test_json_that_is_neither_object_nor_array_is_an_invalid_request(text: str) -> None:
    decoded = decode_message(text, max_batch=MAX_BATCH)
    assert not decoded.is_batch
    payload = only_error(decoded)
    assert_error(payload, id=None, code=-32600, kind="INVALID_REQUEST")


def test_empty_batch_is_answered_with_one_error_object_not_an_array() -> None:
    decoded = decode_message("[]", max_batch=MAX_BATCH)
    assert not decoded.is_batch
    assert_error(only_error(decoded), id=None, code=-32600, kind="INVALID_REQUEST")
    text = answer(decoded)
    assert text is not None
    assert isinstance(json.loads(text), dict)


def test_batch_longer_than_max_batch_is_refused_whole_with_too_large() -> None:
    batch = [request(id=i, method="get", params=["k"]) for i in range(4)]
    decoded = decode(batch, max_batch=3)
    assert not decoded.is_batch
    payload = only_error(decoded)
    assert_error(payload, id=None, code=errors.TooLargeError.code, kind=errors.TooLargeError.kind)
    assert payload["error"]["code"] == -32004


def test_batch_of_exactly_max_batch_is_accepted() -> None:
    batch = [request(id=i, method="get", params=["k"]) for i in range(3)]
    decoded = decode(batch, max_batch=3)
    assert decoded.is_batch
    assert [call.id for call in decoded.calls] == [0, 1, 2]
    assert decoded.errors == []


@pytest.mark.parametrize("max_batch", [0, -1])
def test_max_batch_below_one_is_a_caller_bug(max_batch: int) -> None:
    with pytest.raises(ValueError, match=rf"^max_batch must be >= 1, got {max_batch}$"):
        decode_message("[]", max_batch=max_batch)


# ----------------------------------------------------------------------------
# Valid requests


def test_valid_request_becomes_one_call_with_bytes_args() -> None:
    decoded = decode(request(id=7, method="set", params=["user:1", "alice", "EX", 60]))
    assert decoded == Decoded(
        calls=[
            Call(
                id=7,
                method="set",
                args=(b"user:1", b"alice", b"EX", b"60"),
                notification=False,
                index=0,
            )
        ],
        errors=[],
        is_batch=False,
    )


@pytest.mark.parametrize(
    ("param", "arg"),
    [
        ("", b""),
        ("alice", b"alice"),
        ("caf\u00e9 \u65e5\u672c \U0001f600", "caf\u00e9 \u65e5\u672c \U0001f600".encode()),
        ("\x00", b"\x00"),
        (0, b"0"),
        (60, b"60"),
        (-5, b"-5"),
        (2**63, b"9223372036854775808"),
        (2**200, str(2**200).encode()),
        (1.5, b"1.5"),
        (0.1, b"0.1"),
        (-0.0, b"-0.0"),
        (1e16, b"1e+16"),
        (3.0, b"3.0"),
    ],
)
def test_params_are_converted_to_bytes(param: Any, arg: bytes) -> None:
    (call,) = decode(request(id=1, method="incrbyfloat", params=["k", param])).calls
    assert call.args == (b"k", arg)


def test_integer_too_long_for_python_int_conversion_is_passed_as_its_digits() -> None:
    digits = "-" + "9" * 5000
    text = f'{{"jsonrpc": "2.0", "id": 1, "method": "incrby", "params": ["k", {digits}]}}'
    (call,) = decode_message(text, max_batch=MAX_BATCH).calls
    assert call.args == (b"k", digits.encode())


def test_float_too_large_for_a_double_is_refused_as_a_parameter() -> None:
    text = '{"jsonrpc": "2.0", "id": 3, "method": "incrbyfloat", "params": ["k", 1e400]}'
    decoded = decode_message(text, max_batch=MAX_BATCH)
    assert_error(only_error(decoded), id=3, code=-32600, kind="INVALID_REQUEST")


@pytest.mark.parametrize("members", [{}, {"params": []}])
def test_absent_or_empty_params_give_no_args(members: dict[str, Any]) -> None:
    (call,) = decode(request(id=1, method="dbsize", **members)).calls
    assert call.args == ()


@pytest.mark.parametrize("request_id", [0, 7, -3, 2**70, "", "abc", "\u65e5"])
def test_request_id_is_kept_as_given(request_id: int | str) -> None:
    (call,) = decode(request(id=request_id, method="ping")).calls
    assert call.id == request_id
    assert type(call.id) is type(request_id)
    assert not call.notification


def test_id_null_is_a_request_answered_with_id_null_not_a_notification() -> None:
    decoded = decode(request(id=None, method="ping"))
    (call,) = decoded.calls
    assert call.id is None
    assert not call.notification
    text = answer(decoded)
    assert text == '{"jsonrpc":"2.0","id":null,"result":"OK"}'


def test_request_without_id_member_is_a_notification_and_gets_no_answer() -> None:
    decoded = decode(request(method="set", params=["k", "v"]))
    (call,) = decoded.calls
    assert call.notification
    assert call.id is None
    assert answer(decoded) is None


def test_method_name_is_passed_through_unchanged() -> None:
    for method in ["GET", "Get", "debug.actors", "", "rpc.discover", "no such command"]:
        (call,) = decode(request(id=1, method=method)).calls
        assert call.method == method


def test_members_other_than_those_of_json_rpc_are_ignored() -> None:
    (call,) = decode(request(id=1, method="get", params=["k"], extra={"x": [1]})).calls
    assert call.args == (b"k",)


# ----------------------------------------------------------------------------
# Invalid requests: layer 1 (not a JSON-RPC Request object), always answered

NOT_REQUEST_OBJECTS: list[tuple[str, dict[str, Any]]] = [
    ("jsonrpc missing", {"method": "get"}),
    ("jsonrpc 1.0", {"jsonrpc": "1.0", "method": "get"}),
    ("jsonrpc as a number", {"jsonrpc": 2.0, "method": "get"}),
    ("jsonrpc null", {"jsonrpc": None, "method": "get"}),
    ("method missing", {"jsonrpc": "2.0"}),
    ("method a number", {"jsonrpc": "2.0", "method": 1}),
    ("method null", {"jsonrpc": "2.0", "method": None}),
    ("method an array", {"jsonrpc": "2.0", "method": ["get"]}),
    ("params a string", {"jsonrpc": "2.0", "method": "get", "params": "k"}),
    ("params a number", {"jsonrpc": "2.0", "method": "get", "params": 1}),
    ("params null", {"jsonrpc": "2.0", "method": "get", "params": None}),
    ("params a boolean", {"jsonrpc": "2.0", "method": "get", "params": True}),
]


@pytest.mark.parametrize(("case", "item"), NOT_REQUEST_OBJECTS)
def test_malformed_request_with_valid_id_is_answered_with_that_id(
    case: str, item: dict[str, Any]
) -> None:
    decoded = decode({**item, "id": 42})
    assert_error(only_error(decoded), id=42, code=-32600, kind="INVALID_REQUEST")


@pytest.mark.parametrize(("case", "item"), NOT_REQUEST_OBJECTS)
def test_malformed_request_without_id_is_not_a_notification_and_is_answered_with_id_null(
    case: str, item: dict[str, Any]
) -> None:
    decoded = decode(item)
    assert_error(only_error(decoded), id=None, code=-32600, kind="INVALID_REQUEST")
    assert answer(decoded) is not None


@pytest.mark.parametrize(
    "bad_id", [True, False, 1.5, 1.0, [], [1], {}, {"id": 1}, LONE_SURROGATE, "a\udfffb"]
)
def test_invalid_id_makes_the_request_invalid_and_is_answered_with_id_null(bad_id: Any) -> None:
    decoded = decode(request(id=bad_id, method="ping"))
    assert_error(only_error(decoded), id=None, code=-32600, kind="INVALID_REQUEST")


def test_id_too_long_for_python_int_conversion_is_invalid() -> None:
    text = f'{{"jsonrpc": "2.0", "id": {"1" * 5000}, "method": "ping"}}'
    decoded = decode_message(text, max_batch=MAX_BATCH)
    assert_error(only_error(decoded), id=None, code=-32600, kind="INVALID_REQUEST")


# ----------------------------------------------------------------------------
# Invalid requests: layer 2 (KVMemo's parameter rules), not answered for notifications

BAD_PARAMS: list[tuple[str, dict[str, Any]]] = [
    ("params an object", {"method": "get", "params": {"key": "k"}}),
    ("true param", {"method": "set", "params": ["k", True]}),
    ("false param", {"method": "set", "params": ["k", False]}),
    ("null param", {"method": "set", "params": ["k", None]}),
    ("array param", {"method": "set", "params": ["k", ["v"]]}),
    ("object param", {"method": "set", "params": ["k", {"v": 1}]}),
    ("lone surrogate param", {"method": "set", "params": ["k", "v" + LONE_SURROGATE]}),
    ("lone surrogate key", {"method": "get", "params": [LONE_SURROGATE]}),
    ("lone surrogate method", {"method": "get" + LONE_SURROGATE, "params": ["k"]}),
]


@pytest.mark.parametrize(("case", "members"), BAD_PARAMS)
def test_unacceptable_params_are_an_invalid_request_answered_with_the_id(
    case: str, members: dict[str, Any]
) -> None:
    decoded = decode(request(id="r-1", **members))
    assert_error(only_error(decoded), id="r-1", code=-32600, kind="INVALID_REQUEST")
    text = answer(decoded)
    assert text is not None
    text.encode("utf-8")  # sendable as a WebSocket text message


@pytest.mark.parametrize(("case", "members"), BAD_PARAMS)
def test_notification_with_unacceptable_params_is_neither_run_nor_answered(
    case: str, members: dict[str, Any]
) -> None:
    decoded = decode(request(**members))
    assert decoded.calls == []
    assert decoded.errors == []
    assert answer(decoded) is None


def test_non_finite_float_param_is_refused_not_sent_as_inf() -> None:
    text = '{"jsonrpc": "2.0", "id": 1, "method": "incrbyfloat", "params": ["k", -1e999]}'
    payload = only_error(decode_message(text, max_batch=MAX_BATCH))
    assert_error(payload, id=1, code=-32600, kind="INVALID_REQUEST")


# ----------------------------------------------------------------------------
# Batches


def test_batch_items_keep_their_order_and_index() -> None:
    batch = [
        request(id=1, method="set", params=["a", "1"]),
        request(method="incr", params=["a"]),
        request(id="x", method="get", params=["a"]),
    ]
    decoded = decode(batch)
    assert decoded.is_batch
    assert decoded.errors == []
    assert [(c.index, c.id, c.method, c.notification) for c in decoded.calls] == [
        (0, 1, "set", False),
        (1, None, "incr", True),
        (2, "x", "get", False),
    ]


def test_batch_of_one_request_is_still_answered_with_an_array() -> None:
    decoded = decode([request(id=1, method="ping")])
    assert decoded.is_batch
    text = answer(decoded)
    assert text == '[{"jsonrpc":"2.0","id":1,"result":"OK"}]'


def test_batch_item_with_valid_id_but_bad_params_yields_an_error_carrying_that_id() -> None:
    batch = [
        request(id=1, method="get", params=["a"]),
        request(id=2, method="set", params=["b", None]),
        request(id=3, method="get", params=["c"]),
    ]
    decoded = decode(batch)
    assert [call.id for call in decoded.calls] == [1, 3]
    (error,) = decoded.errors
    assert_error(error.payload, id=2, code=-32600, kind="INVALID_REQUEST")


def test_batch_of_non_objects_gets_one_error_with_id_null_per_item() -> None:
    decoded = decode([1, 2, 3])
    assert decoded.is_batch
    assert decoded.calls == []
    assert len(decoded.errors) == 3
    for error in decoded.errors:
        assert_error(error.payload, id=None, code=-32600, kind="INVALID_REQUEST")


def test_nested_batch_is_an_invalid_item() -> None:
    decoded = decode([[request(id=1, method="ping")]])
    (error,) = decoded.errors
    assert_error(error.payload, id=None, code=-32600, kind="INVALID_REQUEST")


def test_mixed_batch_is_answered_as_json_rpc_2_0_specifies() -> None:
    batch: list[Any] = [
        request(id="1", method="sum", params=[1, 2, 4]),
        request(method="notify_hello", params=[7]),
        request(id="2", method="subtract", params=[42, 23]),
        {"foo": "boo"},
        request(id="5", method="foo.get", params={"name": "myself"}),
        request(id="9", method="get_data"),
        request(method="notify_bad", params=[None]),
    ]
    decoded = decode(batch)
    assert [call.id for call in decoded.calls] == ["1", None, "2", "9"]
    assert sorted((r.id is None, r.id) for r in decoded.errors) == [(False, "5"), (True, None)]
    text = answer(decoded)
    assert text is not None
    answered = json.loads(text)
    assert sorted(str(r["id"]) for r in answered) == ["1", "2", "5", "9", "None"]


def test_batch_of_notifications_only_sends_nothing() -> None:
    decoded = decode([request(method="incr", params=["a"]), request(method="del", params=["b"])])
    assert len(decoded.calls) == 2
    assert answer(decoded) is None


# ----------------------------------------------------------------------------
# Encoding


def test_result_response_puts_id_before_result() -> None:
    response = result_response(7, b"OK")
    assert response.payload == {"jsonrpc": "2.0", "id": 7, "result": "OK"}
    assert encode([response], is_batch=False) == '{"jsonrpc":"2.0","id":7,"result":"OK"}'
    assert response.id == 7
    assert not response.is_error


def test_error_response_carries_code_message_kind_and_data_of_the_error() -> None:
    exc = errors.UnavailableError("shard-3 is restarting", retry_after_ms=20)
    response = error_response("a", exc)
    assert response.payload == {
        "jsonrpc": "2.0",
        "id": "a",
        "error": {
            "code": -32003,
            "message": "shard-3 is restarting",
            "data": {"kind": "UNAVAILABLE", "retry_after_ms": 20},
        },
    }
    assert response.is_error


def test_error_response_of_protocol_example_is_exact() -> None:
    response = error_response(7, errors.ArityError("wrong number of arguments for 'get'"))
    assert encode([response], is_batch=False) == (
        '{"jsonrpc":"2.0","id":7,"error":{"code":-32602,'
        '"message":"wrong number of arguments for \'get\'","data":{"kind":"ARITY"}}}'
    )


def test_error_data_cannot_override_the_kind_of_the_error() -> None:
    response = error_response(1, errors.RequestTimeoutError("too slow", kind="X", applied=None))
    assert response.payload["error"] == {
        "code": -32006,
        "message": "too slow",
        "data": {"kind": "TIMEOUT", "applied": None},
    }


def test_error_response_for_builds_an_error_from_parts() -> None:
    response = error_response_for(None, -32601, "UNKNOWN_METHOD", "no such method", method="x")
    assert response.payload == {
        "jsonrpc": "2.0",
        "id": None,
        "error": {
            "code": -32601,
            "message": "no such method",
            "data": {"kind": "UNKNOWN_METHOD", "method": "x"},
        },
    }


def test_binary_message_is_answered_with_invalid_request_and_id_null() -> None:
    response = binary_message_response()
    assert_error(response.payload, id=None, code=INVALID_REQUEST_CODE, kind=INVALID_REQUEST_KIND)
    payload: dict[str, Any] = response.payload
    assert "binary" in payload["error"]["message"]
    assert INVALID_REQUEST_CODE == -32600
    assert INVALID_REQUEST_KIND == "INVALID_REQUEST"


def test_encode_batch_is_an_array_of_the_responses() -> None:
    responses = [result_response(1, 5), result_response(2, None)]
    assert encode(responses, is_batch=True) == (
        '[{"jsonrpc":"2.0","id":1,"result":5},{"jsonrpc":"2.0","id":2,"result":null}]'
    )


@pytest.mark.parametrize("is_batch", [True, False])
def test_encode_nothing_sends_nothing(is_batch: bool) -> None:
    assert encode([], is_batch=is_batch) is None


def test_encode_two_responses_for_a_single_request_is_a_bug() -> None:
    responses = [result_response(1, 5), result_response(2, 6)]
    with pytest.raises(ValueError, match=r"^a single request has at most one response, got 2$"):
        encode(responses, is_batch=False)


def test_encode_writes_non_ascii_characters_as_themselves() -> None:
    text = encode([result_response(1, "caf\u00e9".encode())], is_batch=False)
    assert text == '{"jsonrpc":"2.0","id":1,"result":"caf\u00e9"}'


def test_encode_escapes_lone_surrogates_so_the_text_is_always_utf8() -> None:
    response = Response({"jsonrpc": "2.0", "id": 1, "result": "a" + LONE_SURROGATE + "\u00e9"})
    text = encode([response], is_batch=False)
    assert text == '{"jsonrpc":"2.0","id":1,"result":"a\\ud800\\u00e9"}'
    text.encode("utf-8")
    assert json.loads(text)["result"] == "a" + LONE_SURROGATE + "\u00e9"


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (b"alice", "alice"),
        ("caf\u00e9".encode(), "caf\u00e9"),
        (b"\xff\xfeok", "\ufffd\ufffdok"),
        (bytearray(b"v"), "v"),
        ("PONG", "PONG"),
        (0, 0),
        (-(2**63), -(2**63)),
        (None, None),
        (True, True),
        (False, False),
        (1.5, 1.5),
        ([b"a", None, 3], ["a", None, 3]),
        ((b"0", [b"k1", b"k2"]), ["0", ["k1", "k2"]]),
        ({"server": {"version": b"1"}, b"keys": [1]}, {"server": {"version": "1"}, "keys": [1]}),
        ([], []),
        ({}, {}),
    ],
)
def test_to_json_result_maps_redis_replies_to_json(value: object, expected: Any) -> None:
    converted = to_json_result(value)
    assert converted == expected
    assert type(converted) is type(expected)


def test_invalid_utf8_in_a_bulk_string_comes_back_with_replacement_characters() -> None:
    text = encode([result_response(1, b"a\x80b")], is_batch=False)
    assert text is not None
    assert json.loads(text)["result"] == "a\ufffdb"


@pytest.mark.parametrize(
    ("value", "error", "message"),
    [
        ({1, 2}, TypeError, r"^cannot send a result of type set as JSON$"),
        (object(), TypeError, r"^cannot send a result of type object as JSON$"),
        ({1: "a"}, TypeError, r"^cannot send a dict key of type int as JSON$"),
        ([math.nan], ValueError, r"^cannot send non-finite float nan as JSON$"),
        (math.inf, ValueError, r"^cannot send non-finite float inf as JSON$"),
    ],
)
def test_to_json_result_refuses_what_json_cannot_hold(
    value: object, error: type[Exception], message: str
) -> None:
    with pytest.raises(error, match=message):
        to_json_result(value)


# ----------------------------------------------------------------------------
# Properties

FUZZ = settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)

any_text = (
    st.text()
    | st.text(st.characters(exclude_categories=()))
    | st.text('[]{}",:-.0123456789eEtrufalsn\\ ')
)

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats()
    | st.text(st.characters(exclude_categories=())),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=8), children, max_size=5)
    ),
    max_leaves=12,
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=6)
    | st.just(LONE_SURROGATE)
)


class _Absent:
    """Marks a member left out of a generated request."""


_ABSENT = _Absent()
absent = st.just(_ABSENT)


good_params = st.lists(
    st.text(max_size=6) | st.integers() | st.floats(allow_nan=False, allow_infinity=False),
    max_size=3,
)
bad_params = (
    st.lists(scalars, min_size=1, max_size=3)
    | st.dictionaries(st.text(max_size=3), scalars, max_size=2)
    | scalars
)


@st.composite
def request_like(draw: st.DrawFn) -> Any:
    """Request objects, each member mostly valid but sometimes broken or left out.

    About one in ten draws is not an object at all.
    """
    if draw(st.integers(0, 9)) == 0:
        return draw(scalars | st.lists(scalars, max_size=2))

    def mostly(good: st.SearchStrategy[Any], bad: st.SearchStrategy[Any]) -> Any:
        return draw(good if draw(st.integers(0, 4)) else bad)

    members = {
        "jsonrpc": mostly(st.just("2.0"), st.sampled_from(["1.0", 2.0, None, _ABSENT])),
        "id": mostly(st.integers(-5, 5) | st.text(max_size=3) | absent, scalars),
        "method": mostly(
            st.sampled_from(["get", "set", "GET", ""]), st.sampled_from([1, None, _ABSENT])
        ),
        "params": mostly(good_params | absent, bad_params),
        "extra": draw(scalars | absent),
    }
    return {name: value for name, value in members.items() if value is not _ABSENT}


def _is_request_object(item: Any) -> bool:
    return (
        isinstance(item, dict)
        and isinstance(item.get("jsonrpc"), str)
        and item["jsonrpc"] == "2.0"
        and isinstance(item.get("method"), str)
        and isinstance(item.get("params", []), list | dict)
    )


def _expected_ids(item: Any) -> list[Any]:
    """The ids of the responses JSON-RPC 2.0 requires for one item (none for a Notification)."""
    if isinstance(item, dict) and "id" in item:
        value = item["id"]
        valid = (
            value is None
            or (type(value) is int)
            or (isinstance(value, str) and LONE_SURROGATE not in value)
        )
        return [value if valid else None]
    if _is_request_object(item):
        return []
    return [None]


def _assert_answer_is_sendable_json(decoded: Decoded) -> Any:
    for error in decoded.errors:
        assert error.is_error
        payload: dict[str, Any] = error.payload
        assert payload["error"]["data"]["kind"] in {"PARSE", "INVALID_REQUEST", "TOO_LARGE"}
    text = answer(decoded)
    if text is None:
        return None
    text.encode("utf-8")
    return json.loads(text)


def _ids_key(ids: list[Any]) -> list[str]:
    return sorted(json.dumps(value) for value in ids)


@FUZZ
@given(any_text)
def test_decoding_arbitrary_text_never_raises_and_answers_with_json(text: str) -> None:
    decoded = decode_message(text, max_batch=MAX_BATCH)
    answered = _assert_answer_is_sendable_json(decoded)
    if not decoded.is_batch:
        assert len(decoded.errors) + len(decoded.calls) <= 1
        assert answered is None or isinstance(answered, dict)


@FUZZ
@given(json_values)
def test_decoding_arbitrary_json_never_raises_and_answers_with_json(value: Any) -> None:
    text = json.dumps(value)  # NaN and Infinity when value holds them: not JSON
    decoded = decode_message(text, max_batch=MAX_BATCH)
    answered = _assert_answer_is_sendable_json(decoded)
    strict_json = "NaN" not in text and "Infinity" not in text
    if strict_json and isinstance(value, list) and 0 < len(value) <= MAX_BATCH:
        assert decoded.is_batch
        assert isinstance(answered, list) or answered is None
    for call in decoded.calls:
        assert all(isinstance(arg, bytes) for arg in call.args)


@FUZZ
@given(st.lists(request_like(), min_size=1, max_size=6))
def test_batch_gets_one_response_per_item_except_notifications_with_matching_ids(
    batch: list[Any],
) -> None:
    decoded = decode(batch)
    assert decoded.is_batch
    answered = _assert_answer_is_sendable_json(decoded)
    expected = [request_id for item in batch for request_id in _expected_ids(item)]
    if not expected:
        assert answered is None
        return
    assert isinstance(answered, list)
    got = [response["id"] for response in answered]
    assert _ids_key(got) == _ids_key(expected)
    assert [call.index for call in decoded.calls] == sorted({call.index for call in decoded.calls})


@FUZZ
@given(request_like())
def test_single_item_gets_at_most_one_response_as_an_object(item: Any) -> None:
    decoded = decode(item)
    answered = _assert_answer_is_sendable_json(decoded)
    if isinstance(item, list):
        return  # a batch, covered above
    expected = _expected_ids(item)
    if not expected:
        assert answered is None
    else:
        assert isinstance(answered, dict)
        assert json.dumps(answered["id"]) == json.dumps(expected[0])


# ----------------------------------------------------------------------------
# Fast paths: the same answers as the general code

any_char_text = st.text(st.characters(exclude_categories=()), max_size=8)

plain_requests = st.fixed_dictionaries(
    {
        "jsonrpc": st.just("2.0"),
        "id": st.integers() | any_char_text,
        "method": st.sampled_from(["get", "set", "mget", "ping"]) | any_char_text,
        "params": st.lists(any_char_text | st.integers(), max_size=4),
    }
)


class _RefusingDecoder:
    """Stands in for the prebuilt decoder: every text goes to the general parse."""

    def decode(self, text: str) -> Any:
        raise ValueError("fast path off")


def decode_slow(text: str, *, max_batch: int = MAX_BATCH) -> Decoded:
    """decode_message with both of its fast paths turned off: the general code alone."""
    with (
        mock.patch.object(jsonrpc, "_FAST_DECODER", _RefusingDecoder()),
        mock.patch.object(jsonrpc, "_plain_call", return_value=None),
    ):
        return decode_message(text, max_batch=max_batch)


@FUZZ
@given(st.lists(plain_requests, min_size=1, max_size=6) | plain_requests)
def test_fast_decoding_of_valid_requests_equals_the_general_code(document: Any) -> None:
    text = json.dumps(document)
    assert decode_message(text, max_batch=MAX_BATCH) == decode_slow(text)


@FUZZ
@given(st.lists(request_like(), min_size=1, max_size=6) | request_like() | json_values)
def test_fast_decoding_of_anything_equals_the_general_code(document: Any) -> None:
    text = json.dumps(document)
    assert decode_message(text, max_batch=MAX_BATCH) == decode_slow(text)


@pytest.mark.parametrize(
    "text",
    [
        '{"jsonrpc":"2.0","id":1,"method":"get","params":[' + "9" * 5000 + "]}",
        '{"jsonrpc":"2.0","id":' + "9" * 5000 + ',"method":"get","params":[]}',
        '{"jsonrpc":"2.0","id":1,"method":"get","params":[NaN]}',
        '\ufeff{"jsonrpc":"2.0","id":1,"method":"get","params":[]}',
        '{"jsonrpc":"2.0","id":1,"method":"get","params":["\\ud800"]}',
        '{"jsonrpc":"2.0","id":true,"method":"get","params":[]}',
        '{"jsonrpc":"2.0","id":1,"method":"get","params":[1.5, false]}',
        "[" * 100_000,
    ],
)
def test_fast_decoding_of_edge_cases_equals_the_general_code(text: str) -> None:
    assert decode_message(text, max_batch=MAX_BATCH) == decode_slow(text)


results = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | any_char_text
    | st.binary(max_size=8),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(any_char_text | st.binary(max_size=4), children, max_size=3)
    ),
    max_leaves=8,
)
request_ids = st.none() | st.integers() | any_char_text


@FUZZ
@given(st.lists(st.tuples(request_ids, results), min_size=1, max_size=5), st.booleans())
def test_response_texts_equal_encoded_responses(
    answers: list[tuple[Any, Any]], is_batch: bool
) -> None:
    if not is_batch:
        answers = answers[:1]
    responses = [result_response(id, result) for id, result in answers]
    texts = [response_text(id, result) for id, result in answers]
    assert texts == [text_of(response) for response in responses]
    assert encode_texts(texts, is_batch=is_batch) == encode(responses, is_batch=is_batch)


@FUZZ
@given(request_ids, any_char_text)
def test_error_texts_equal_encoded_error_responses(id: Any, message: str) -> None:
    error = errors.UnavailableError(message, retry_after_ms=5)
    response = error_response(id, error)
    assert error_text(id, error) == text_of(response)
    assert encode_texts([error_text(id, error)], is_batch=False) == encode(
        [response], is_batch=False
    )


def test_response_text_refuses_what_to_json_result_refuses() -> None:
    with pytest.raises(ValueError, match=r"^cannot send non-finite float nan as JSON$"):
        response_text(1, math.nan)
    with pytest.raises(TypeError, match=r"^cannot send a result of type object as JSON$"):
        response_text(1, object())


def test_encode_texts_of_nothing_is_nothing_and_single_takes_one() -> None:
    assert encode_texts([], is_batch=True) is None
    with pytest.raises(ValueError, match=r"^a single request has at most one response, got 2$"):
        encode_texts(["{}", "{}"], is_batch=False)


@pytest.mark.parametrize(
    "result",
    [
        "\udc80",
        "caf\u00e9 \ud800 \U0001f600 \x7f \u2028",
        ["\udfff", {"k\u00e9": "\ud83d"}],
        b"\xff",
    ],
)
def test_response_texts_with_lone_surrogates_are_escaped_as_encode_escapes_them(
    result: Any,
) -> None:
    responses = [result_response(7, result), result_response("\u00e9", "x")]
    texts = [response_text(7, result), response_text("\u00e9", "x")]
    assert encode_texts(texts, is_batch=True) == encode(responses, is_batch=True)
    assert encode_texts(texts[:1], is_batch=False) == encode(responses[:1], is_batch=False)
