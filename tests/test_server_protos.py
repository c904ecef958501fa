"""The wire contract: committed stubs match protos/, and the KServe messages match the public specification
(tritonclient's own descriptors) field by field, so existing clients work unchanged."""

from __future__ import annotations


import pytest
from google.protobuf import descriptor as d
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

from server import protogen
from server._proto.kserve.v2 import grpc_service_pb2 as kserve
from server._proto.mmkd.v1 import inference_pb2 as mmkd


def test_committed_stubs_are_what_protogen_generates(tmp_path):
    protogen.generate(protogen.PROTO_DIR, tmp_path)
    committed = protogen.OUT_DIR
    generated = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*.py*"))
    assert generated == sorted(p.relative_to(committed) for p in committed.rglob("*.py*")
                               if "__pycache__" not in p.parts)
    stale = [str(rel) for rel in generated if (tmp_path / rel).read_text() != (committed / rel).read_text()]
    assert not stale, f"stale stubs {stale}: run `python -m server.protogen`"


def _fields(message: d.Descriptor) -> dict[str, tuple]:
    return {f.name: (f.number, f.type, f.is_repeated) for f in message.fields}


def _upstream(name: str) -> d.Descriptor:
    for module in (triton_service, triton_config):
        if name in module.DESCRIPTOR.message_types_by_name:
            return module.DESCRIPTOR.message_types_by_name[name]
    raise KeyError(name)


def _walk(message: d.Descriptor):
    yield message
    for nested in message.nested_types:
        if not nested.GetOptions().map_entry:
            yield from _walk(nested)


@pytest.mark.parametrize("name", sorted(kserve.DESCRIPTOR.message_types_by_name))
def test_kserve_messages_match_upstream_names_and_numbers(name):
    ours = kserve.DESCRIPTOR.message_types_by_name[name]
    theirs = _upstream(name)
    for mine in _walk(ours):
        upstream = theirs.file.pool.FindMessageTypeByName(mine.full_name)
        for field, spec in _fields(mine).items():
            assert field in _fields(upstream), f"{mine.full_name}.{field} is not in the specification"
            assert _fields(upstream)[field] == spec, f"{mine.full_name}.{field}: {spec} vs {_fields(upstream)[field]}"


def test_kserve_service_methods_and_types_match_upstream():
    ours = kserve.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    for method in ours.methods:
        upstream = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == upstream.input_type.full_name
        assert method.output_type.full_name == upstream.output_type.full_name


def test_enums_match_upstream():
    assert {v.name: v.number for v in kserve.DataType.DESCRIPTOR.values} == {
        v.name: v.number for v in triton_config.DataType.DESCRIPTOR.values}


def test_every_mmkd_message_and_field_is_commented():
    source = (protogen.PROTO_DIR / "mmkd/v1/inference.proto").read_text().splitlines()
    for i, line in enumerate(source):
        stripped = line.strip()
        if stripped.startswith(("message ", "rpc ", "service ")) or (stripped.endswith(";") and "=" in stripped
                                                                   and not stripped.startswith("//")):
            if stripped.startswith(("syntax", "package")):
                continue
            assert source[i - 1].strip().startswith("//"), f"inference.proto:{i + 1} has no comment: {stripped}"
    assert mmkd.DESCRIPTOR.package == "mmkd.v1"
