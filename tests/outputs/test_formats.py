"""The on-disk format (surgery/core/output_format.py) and the format registry (exporters/formats.py):
every format implements the registry's interface, `check OUT` re-validates every format present, and
surgery.json / the ONNX metadata record are validated where they are read and written."""
from __future__ import annotations

import importlib
import json
import shutil
import struct

import pytest

from surgery.exporters.formats import FORMATS, cli_choices, format_for_cli, format_named
from surgery.cli import main
from surgery.core.errors import IntegrityError, ModelInputError, UsageError
from surgery.core.output_format import (META_PREFIX, SURGERY_FILE, OnnxMetadata, read_surgery_json,
                                        write_surgery_json)
from tests.helpers import cli


# ---- the registry ------------------------------------------------------------------------------------

def test_every_format_implements_the_registry_interface():
    assert [f.name for f in FORMATS] == ["onnx", "onnx_hf", "openvino"]
    assert len({f.parity_key for f in FORMATS}) == len({f.files[0] for f in FORMATS}) == len(FORMATS)
    for f in FORMATS:
        mod = importlib.import_module(f.module)
        assert all(callable(getattr(mod, fn, None)) for fn in ("export_format", "open_session", "validate_present"))
        assert format_for_cli(f.cli_format, f.cli_layout) is f and format_named(f.name) is f
    assert cli_choices() == (["onnx", "openvino"], ["plain", "hf"])
    with pytest.raises(UsageError, match="known: onnx, onnx_hf, openvino"):
        format_named("tflite")


def test_check_revalidates_every_format_present(baked_dir, tmp_path, capsys):
    out = tmp_path / "out"
    shutil.copytree(baked_dir, out)
    for fmt in ("onnx", "openvino"):
        code, _, err = cli(["export", out, "--format", fmt, "-q"], capsys)
        assert code == 0, err
    code, stdout, err = cli(["check", out, "--num-images", "6"], capsys)
    assert code == 0, err
    assert "onnx PASS" in stdout and "openvino PASS (float32, OpenVINO CPU plugin, f32" in stdout
    doc = json.loads((out / "parity.json").read_text())
    assert doc["onnx"]["passed"] and doc["openvino"]["passed"] and doc["openvino"]["format"] == "openvino"
    # a damaged IR (weights overwritten) is caught by check, not only at export: the export recorded its
    # files' hashes in OUT's integrity record, so check stops on the record first (exit 11, naming the file)
    data = bytearray((out / "openvino_model.bin").read_bytes())
    mid = (len(data) // 2) & ~3
    data[mid:mid + 1024] = struct.pack("<f", 1000.0) * 256
    (out / "openvino_model.bin").write_bytes(bytes(data))
    code, stdout, err = cli(["check", out, "--num-images", "6"], capsys)
    assert code == 11 and "openvino_model.bin" in err, err
    assert len(err.strip().splitlines()) == 1


def test_convert_formats_writes_each_format_before_out_is_moved_into_place(organism_dir, tmp_path, capsys):
    neurons = tmp_path / "n.json"
    neurons.write_text(json.dumps({"register_neurons": {"2": [17, 101], "3": [42]}}))
    code, _, err = cli(["convert", organism_dir, "--neurons", neurons, "--out", tmp_path / "o", "--formats",
                        "openvino", "--no-check", "-q"], capsys)
    assert code == 0, err
    assert (tmp_path / "o" / "openvino_model.xml").is_file() and not (tmp_path / "o" / "model.onnx").exists()
    with pytest.raises(SystemExit) as e:
        main(["convert", str(organism_dir), "--neurons", str(neurons), "--out", str(tmp_path / "p"),
              "--formats", "tflite"])
    assert e.value.code == 2 and "known: onnx, onnx_hf, openvino" in capsys.readouterr().err


# ---- surgery.json and the ONNX metadata record ------------------------------------------------------------

def test_surgery_json_is_validated_where_it_is_read_and_written(tmp_path):
    doc = {"recipe": {"register_neurons": {"2": [17]}}, "token_layout": {"register_indices": [1]}}
    path = write_surgery_json(tmp_path, doc)
    assert path.name == SURGERY_FILE and read_surgery_json(tmp_path) == doc
    assert path.read_text().endswith("}\n") and json.loads(path.read_text()) == doc
    assert read_surgery_json(tmp_path / "missing") is None
    with pytest.raises(ValueError, match="malformed"):
        write_surgery_json(tmp_path, {"token_layout": {}})
    for bad, words in (("{not json", "not valid JSON"), ("[]", "not a JSON object"), ('{"source": {}}', "no 'recipe'"),
                       ('{"recipe": {}, "token_layout": {"register_indices": ["1"]}}', "register_indices")):
        path.write_text(bad)
        with pytest.raises(ModelInputError, match=words):
            read_surgery_json(tmp_path)
        with pytest.raises(IntegrityError, match=words):
            read_surgery_json(tmp_path, kind=IntegrityError)


def test_onnx_metadata_round_trips_through_props():
    meta = OnnxMetadata(recipe={"register_neurons": {"2": [17]}}, token_layout={"num_prefix_tokens": 1},
                        register_token_indices=[1], num_prefix_tokens=1, num_registers=1, dtype="float32",
                        export_batch_size=2, extra={"future_key": "kept"})
    props = meta.to_props()
    assert all(k.startswith(META_PREFIX) and isinstance(v, str) for k, v in props.items())
    assert props[META_PREFIX + "format_version"] == "1" and props[META_PREFIX + "tool"] == "vit-surgery"
    assert props[META_PREFIX + "num_registers"] == "1" and json.loads(props[META_PREFIX + "recipe"]) == meta.recipe
    back = OnnxMetadata.from_props({**props, "producer_key": "ignored"})
    assert back.to_props() == props and back.as_dict()["future_key"] == "kept"
    assert OnnxMetadata.from_props({}).as_dict() == {}
    with pytest.raises(ModelInputError, match="vit_surgery.num_registers is malformed"):
        OnnxMetadata.from_props({META_PREFIX + "num_registers": "one"}, "m.onnx")
