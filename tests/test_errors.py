from kvmemo import errors


def test_every_error_kind_has_a_distinct_class_and_code_of_the_protocol() -> None:
    assert errors.ERROR_KINDS["SYNTAX"] is errors.CommandSyntaxError
    assert errors.ERROR_KINDS["OOM"].code == -32002
    assert errors.ERROR_KINDS["UNAVAILABLE"].code == -32003
    assert len({cls.kind for cls in errors.ERROR_KINDS.values()}) == len(errors.ERROR_KINDS)


def test_error_keeps_message_and_data() -> None:
    exc = errors.UnavailableError("shard-3 is restarting", retry_after_ms=20)
    assert str(exc) == "shard-3 is restarting"
    assert exc.data == {"retry_after_ms": 20}
    assert isinstance(exc, errors.KVMemoError)
