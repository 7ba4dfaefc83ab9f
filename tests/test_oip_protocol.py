"""The Open Inference Protocol v2 without a server: tritonclient's own request bytes parse into the
images they carry, our answers decode with tritonclient's own parser, and every malformed request is
the 4xx ServiceError that names what is wrong.
"""
from __future__ import annotations

import base64
import io
import json
import struct

import numpy as np
import pytest
import tritonclient.http as httpclient
from PIL import Image

from exporters.preprocess import ResizePolicy, load_model_input
from service import oip, oip_request
from service.errors import ServiceError
from service.predictions import Classification, build_prediction_record, model_input, lossless_image_bytes, pixels_sha256, top_k
from service.request_validation import PixelImage, Upload

MAX_FILES = 4
LABELS = ["cat", "dog", "émeu"]  # a non-ASCII label: BYTES carry UTF-8


def _pixels(n: int = 2, h: int = 5, w: int = 7) -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (20, 30, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _triton_body(name: str, array: np.ndarray, datatype: str, binary: bool, outputs=None) -> tuple[bytes, str | None]:
    """The body and Inference-Header-Content-Length tritonclient sends for one input."""
    tensor = httpclient.InferInput(name, list(array.shape), datatype)
    tensor.set_data_from_numpy(array, binary_data=binary)
    body, json_size = httpclient.InferenceServerClient.generate_request_body([tensor], outputs=outputs)
    return body, None if json_size is None else str(json_size)


def _parse(body: bytes, header_length: str | None = None) -> oip.InferRequest:
    return oip_request.parse_infer_request(body, header_length, MAX_FILES)


def _json(payload) -> bytes:
    return json.dumps(payload).encode()


# requests ------------------------------------------------------------------------------------

def test_binary_bytes_input_carries_each_file_exactly_as_sent():
    files = [_jpeg(1), _jpeg(2)]
    body, length = _triton_body(oip.FILES, np.array(files, dtype=np.object_), "BYTES", binary=True)
    parsed = _parse(body, length)
    assert [u.data for u in parsed.images] == files
    assert [u.filename for u in parsed.images] == ["images[0]", "images[1]"]


def test_a_request_naming_no_outputs_gets_all_of_them_in_binary_as_tritonclient_expects():
    body, length = _triton_body(oip.FILES, np.array([_jpeg(1)], dtype=np.object_), "BYTES", binary=True)
    assert _parse(body, length).outputs == tuple(oip.RequestedOutput(n, True) for n in oip.OUTPUTS)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_uint8_input_carries_the_pixels_in_either_encoding(binary):
    pixels = _pixels()
    body, length = _triton_body(oip.PIXELS, pixels, "UINT8", binary=binary)
    parsed = _parse(body, length)
    assert all(isinstance(p, PixelImage) for p in parsed.images)
    np.testing.assert_array_equal(np.stack([p.pixels for p in parsed.images]), pixels)
    assert [p.filename for p in parsed.images] == ["pixels[0]", "pixels[1]"]


def test_uint8_json_data_may_be_nested_as_its_shape():
    pixels = _pixels(1, 2, 2)
    payload = {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 2, 2, 3], "data": pixels.tolist()}]}
    np.testing.assert_array_equal(_parse(_json(payload)).images[0].pixels, pixels[0])


def test_bytes_in_json_are_base64_files_as_tritonclient_sends_base64_text():
    files = [_jpeg(3)]
    encoded = np.array([base64.b64encode(f) for f in files], dtype=np.object_)
    body, length = _triton_body(oip.FILES, encoded, "BYTES", binary=False)
    assert length is None
    assert [u.data for u in _parse(body).images] == files


def test_requested_outputs_are_answered_in_the_encoding_each_asks_for():
    outputs = [httpclient.InferRequestedOutput("label", binary_data=False),
               httpclient.InferRequestedOutput("probabilities", binary_data=True)]
    body, length = _triton_body(oip.PIXELS, _pixels(1), "UINT8", binary=True, outputs=outputs)
    assert _parse(body, length).outputs == (oip.RequestedOutput("label", False), oip.RequestedOutput("probabilities", True))


def test_binary_data_output_is_the_default_for_outputs_that_do_not_say():
    payload = {"parameters": {"binary_data_output": True}, "outputs": [{"name": "label"}],
               "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 3], "data": [1, 2, 3]}]}
    assert _parse(_json(payload)).outputs == (oip.RequestedOutput("label", True),)


# responses -----------------------------------------------------------------------------------

def _classification(n: int = 2, logged: bool = True, calibrated: bool = True) -> Classification:
    probs = np.random.default_rng(1).dirichlet(np.ones(len(LABELS)), n).astype(np.float32)
    top = top_k(probs, 2)
    records = [build_prediction_record(prediction_id=f"id{i}", created_at=0.0, model_version="v7", labels=LABELS,
                                       probabilities=probs[i], top=top[i], image_sha256="0" * 64, image_stored=False,
                                       filename=f"images[{i}]") for i in range(n)]
    sets = probs > 0.2 if calibrated else None
    return Classification("v7", LABELS, records, probs, top, logged, sets, np.arange(n) % 2 == 1)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_an_answer_decodes_with_tritonclient_to_the_classification(binary):
    result = _classification()
    request = oip.InferRequest([], tuple(oip.RequestedOutput(n, binary) for n in oip.OUTPUTS), "req-1")
    body, length = oip.encode_infer_response(request, result)
    assert (length is not None) == binary
    decoded = httpclient.InferenceServerClient.parse_response_body(body, header_length=length)
    np.testing.assert_array_equal(decoded.as_numpy("probabilities"), result.probabilities)
    labels = [v.decode() if isinstance(v, bytes) else v for v in decoded.as_numpy("label")]
    ids = [v.decode() if isinstance(v, bytes) else v for v in decoded.as_numpy("prediction_id")]
    assert labels == [r.label for r in result.records] and ids == ["id0", "id1"]
    np.testing.assert_array_equal(decoded.as_numpy("prediction_set"), result.sets)
    assert decoded.as_numpy("abstained").tolist() == [False, True]
    response = decoded.get_response()
    assert (response["model_name"], response["model_version"], response["id"]) == ("cnnloop", "v7", "req-1")
    assert response["parameters"] == {"logged": True, "calibrated": True}


def test_an_uncalibrated_answer_sends_the_trivial_set_and_says_so():
    request = oip.InferRequest([], (oip.RequestedOutput("prediction_set", False),))
    answer = json.loads(oip.encode_infer_response(request, _classification(2, calibrated=False))[0])
    assert answer["outputs"][0]["data"] == [True] * (2 * len(LABELS)) and answer["parameters"]["calibrated"] is False


def test_an_answer_holds_only_the_outputs_asked_for_and_says_when_the_log_did_not_take_it():
    request = oip.InferRequest([], (oip.RequestedOutput("label", False),))
    body, length = oip.encode_infer_response(request, _classification(1, logged=False))
    answer = json.loads(body)
    assert length is None and [o["name"] for o in answer["outputs"]] == ["label"] and "id" not in answer
    assert answer["parameters"] == {"logged": False, "calibrated": True}


def test_model_metadata_lists_both_inputs_and_the_outputs_with_the_class_count():
    meta = oip.model_metadata("v7", LABELS)
    assert meta["versions"] == ["v7"] and meta["platform"] == "onnxruntime"
    assert {(t["name"], t["datatype"]) for t in meta["inputs"]} == {("images", "BYTES"), ("pixels", "UINT8")}
    assert meta["outputs"][0] == {"name": "probabilities", "datatype": "FP32", "shape": [-1, 3]}
    assert meta["parameters"]["labels"] == LABELS


def test_an_error_body_is_the_protocols_with_the_project_code():
    e = ServiceError("bad thing; do this", code="shape_mismatch", status=400)
    assert oip.error_body(e) == {"error": "bad thing; do this", "code": "shape_mismatch"}


# decoded pixels in the log -------------------------------------------------------------------

def test_pixels_are_named_by_their_values_whatever_their_memory_layout():
    pixels = _pixels(1, 6, 4)[0]
    strided = np.asfortranarray(pixels)
    assert pixels_sha256(pixels) == pixels_sha256(strided)
    assert pixels_sha256(pixels) != pixels_sha256(pixels.reshape(4, 6, 3))  # same bytes, another image


def test_stored_pixels_decode_back_to_the_same_model_input():
    pixels = _pixels(1, 40, 50)[0]
    policy = ResizePolicy(crop_size=16, resize_size=20)
    stored = lossless_image_bytes(pixels)
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(stored)).convert("RGB")), pixels)
    np.testing.assert_array_equal(load_model_input(stored, policy),
                                  model_input(0, PixelImage("pixels[0]", pixels), policy))


# bad requests --------------------------------------------------------------------------------

def _one(name="pixels", datatype="UINT8", shape=(1, 1, 1, 3), **fields) -> bytes:
    tensor = {"name": name, "datatype": datatype, "shape": list(shape), **fields}
    if "data" not in fields and "parameters" not in fields:
        tensor["data"] = [0] * int(np.prod(shape))
    return _json({"inputs": [tensor]})


def _with_binary(tensor: dict, raw: bytes, extra: dict | None = None) -> tuple[bytes, str]:
    header = _json({"inputs": [tensor], **(extra or {})})
    return header + raw, str(len(header))


def _bytes_elements(*items: bytes) -> bytes:
    return b"".join(struct.pack("<I", len(i)) + i for i in items)


_FILES_BINARY = lambda shape, raw: _with_binary(  # noqa: E731
    {"name": "images", "datatype": "BYTES", "shape": shape, "parameters": {"binary_data_size": len(raw)}}, raw)

BAD_REQUESTS = {
    "not_json": ((b'{"inputs": [', None), 400, "malformed_json"),
    "json_not_an_object": ((b"[1, 2]", None), 400, "malformed_json"),
    "json_nested_too_deep": ((b"[" * 100_000, None), 400, "malformed_json"),
    "no_inputs": ((_json({"inputs": []}), None), 400, "invalid_inference_request"),
    "two_inputs": ((_json({"inputs": [json.loads(_one())["inputs"][0]] * 2}), None), 400, "invalid_inference_request"),
    "input_not_an_object": ((_json({"inputs": [None]}), None), 400, "invalid_inference_request"),
    "unknown_input": ((_one(name="input0"), None), 400, "unknown_input"),
    "input_name_not_a_string": ((_one(name=["pixels"]), None), 400, "unknown_input"),
    "files_as_uint8": ((_one(name="images", datatype="UINT8", shape=[1]), None), 400, "wrong_datatype"),
    "pixels_as_fp32": ((_one(datatype="FP32"), None), 400, "wrong_datatype"),
    "pixels_of_rank_3": ((_one(shape=(1, 1, 3)), None), 400, "shape_mismatch"),
    "pixels_with_alpha": ((_one(shape=(1, 1, 1, 4)), None), 400, "shape_mismatch"),
    "pixels_zero_height": ((_one(shape=(1, 0, 1, 3), data=[]), None), 400, "shape_mismatch"),
    "negative_dimension": ((_one(shape=(1, -1, 1, 3), data=[]), None), 400, "shape_mismatch"),
    "shape_not_integers": ((_one(shape=(1, 1.0, 1, 3), data=[0, 0, 0]), None), 400, "shape_mismatch"),
    "no_images": ((_one(shape=(0, 1, 1, 3), data=[]), None), 400, "shape_mismatch"),
    "too_many_images": ((_one(shape=(MAX_FILES + 1, 1, 1, 3)), None), 413, "too_many_files"),
    "json_pixels_floats": ((_one(data=[0.5, 1, 2]), None), 400, "wrong_datatype"),
    "json_pixels_booleans": ((_one(data=[True, False, True]), None), 400, "wrong_datatype"),
    "json_pixels_over_255": ((_one(data=[0, 256, 0]), None), 400, "wrong_datatype"),
    "json_pixels_negative": ((_one(data=[0, -1, 0]), None), 400, "wrong_datatype"),
    "json_pixels_strings": ((_one(data=["a", "b", "c"]), None), 400, "wrong_datatype"),
    "json_pixels_too_few": ((_one(data=[0, 0]), None), 400, "data_size_mismatch"),
    "json_pixels_nested_wrong": ((_one(shape=(1, 2, 1, 3), data=[[[[0, 0, 0, 0, 0, 0]]]]), None), 400,
                                 "data_size_mismatch"),
    "json_pixels_ragged": ((_one(shape=(1, 1, 2, 3), data=[[[[0, 0, 0], [0, 0]]]]), None), 400, "shape_mismatch"),
    "json_files_not_base64": ((_one(name="images", datatype="BYTES", shape=[1], data=["not base64!"]), None), 400,
                              "bad_base64"),
    "json_files_not_strings": ((_one(name="images", datatype="BYTES", shape=[1], data=[7]), None), 400, "bad_base64"),
    "json_files_fewer_than_shape": ((_one(name="images", datatype="BYTES", shape=[2], data=["AA=="]), None), 400,
                                    "shape_mismatch"),
    "neither_data_nor_binary": ((_one(parameters={}), None), 400, "invalid_inference_request"),
    "both_data_and_binary": ((_one(data=[0, 0, 0], parameters={"binary_data_size": 3}), None), 400,
                             "invalid_inference_request"),
    "binary_size_null": ((_one(data=[0, 0, 0], parameters={"binary_data_size": None}), None), 400,
                         "invalid_inference_request"),
    "binary_size_not_a_count": (_with_binary({"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 3],
                                              "parameters": {"binary_data_size": "3"}}, b"\0\0\0"), 400, "bad_binary_data"),
    "binary_size_over_the_body": (_with_binary({"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 1, 3],
                                                "parameters": {"binary_data_size": 4}}, b"\0\0\0"), 400, "data_size_mismatch"),
    "binary_without_header_length": ((_one(parameters={"binary_data_size": 3}) + b"\0\0\0", None), 400, "malformed_json"),
    "binary_pixels_short": (_with_binary({"name": "pixels", "datatype": "UINT8", "shape": [1, 1, 2, 3],
                                          "parameters": {"binary_data_size": 3}}, b"\0\0\0"), 400, "data_size_mismatch"),
    "bytes_after_json_data": ((_one() + b"xx", str(len(_one()))), 400, "data_size_mismatch"),
    "header_length_past_the_body": ((_one(), "99999"), 400, "bad_binary_data"),
    "header_length_not_a_number": ((_one(), "-3"), 400, "bad_binary_data"),
    "bytes_element_truncated_length": (_FILES_BINARY([1], b"\x05\0"), 400, "bad_binary_data"),
    "bytes_element_past_the_end": (_FILES_BINARY([1], struct.pack("<I", 10) + b"abc"), 400, "bad_binary_data"),
    "bytes_fewer_than_shape": (_FILES_BINARY([2], _bytes_elements(b"abc")), 400, "shape_mismatch"),
    "bytes_more_than_shape": (_FILES_BINARY([1], _bytes_elements(b"abc", b"def")), 400, "shape_mismatch"),
    "shared_memory_input": ((_one(parameters={"shared_memory_region": "r"}), None), 400, "invalid_inference_request"),
    "unknown_output": ((_json({**json.loads(_one()), "outputs": [{"name": "logits"}]}), None), 400, "unknown_output"),
    "output_twice": ((_json({**json.loads(_one()), "outputs": [{"name": "label"}] * 2}), None), 400, "unknown_output"),
    "outputs_not_a_list": ((_json({**json.loads(_one()), "outputs": {}}), None), 400, "invalid_inference_request"),
    "classification_extension": ((_json({**json.loads(_one()), "outputs": [
        {"name": "label", "parameters": {"classification": 2}}]}), None), 400, "invalid_inference_request"),
    "binary_data_not_a_boolean": ((_json({**json.loads(_one()), "outputs": [
        {"name": "label", "parameters": {"binary_data": "yes"}}]}), None), 400, "invalid_inference_request"),
    "binary_data_output_not_a_boolean": ((_json({**json.loads(_one()), "parameters": {"binary_data_output": 1}}), None),
                                         400, "invalid_inference_request"),
    "parameters_null": ((_json({**json.loads(_one()), "parameters": None}), None), 400, "invalid_inference_request"),
    "id_not_a_string": ((_json({**json.loads(_one()), "id": 5}), None), 400, "invalid_inference_request"),
}


@pytest.mark.parametrize("case", list(BAD_REQUESTS))
def test_a_bad_infer_request_is_a_4xx_that_says_what_is_wrong(case):
    (body, header_length), status, code = BAD_REQUESTS[case]
    with pytest.raises(ServiceError) as e:
        _parse(body, header_length)
    assert (e.value.status, e.value.code) == (status, code), e.value.message
    assert e.value.message


@pytest.mark.parametrize("content_type, encoding, code", [
    ("text/plain", None, "unsupported_media_type"),
    ("multipart/form-data; boundary=x", None, "unsupported_media_type"),
    ("application/json", "gzip", "unsupported_content_encoding"),
])
def test_a_body_the_protocol_does_not_carry_is_415(content_type, encoding, code):
    with pytest.raises(ServiceError) as e:
        oip_request.check_media_type(content_type, encoding)
    assert (e.value.status, e.value.code) == (415, code)


@pytest.mark.parametrize("content_type", [None, "application/json", "application/json; charset=utf-8",
                                          "application/octet-stream"])
def test_json_binary_and_no_content_type_are_accepted(content_type):
    oip_request.check_media_type(content_type, None)  # tritonclient sends none


def test_pixels_over_the_pixel_limit_are_422_naming_the_limit():
    with pytest.raises(ServiceError) as e:
        model_input(0, PixelImage("pixels[0]", np.zeros((20, 30, 3), np.uint8)), ResizePolicy(16, 20), max_pixels=500)
    assert (e.value.status, e.value.code) == (422, "too_many_pixels")
    assert "CNNLOOP_MAX_PIXELS" in e.value.message and "pixels[0]" in e.value.message


def test_a_bytes_element_that_is_not_an_image_is_422_naming_the_element():
    with pytest.raises(ServiceError) as e:
        model_input(1, Upload("images[1]", b"not an image"), ResizePolicy(16, 20))
    assert (e.value.status, e.value.code) == (422, "bad_image") and "images[1]" in e.value.message
