"""DMD2 schedules: parsing, presets, sigmas read from the model's own table, clear refusals."""

import pytest
import torch

import comfy.model_sampling
import tiny_models
from comfyui_dmd2.nodes import schedules
from comfyui_dmd2.nodes.schedules import (
    PRESETS,
    ScheduleError,
    UnsupportedModelError,
    parse_timesteps,
    schedule_sigmas,
    sigmas_for_timesteps,
)


@pytest.fixture(scope="module")
def sd15():
    return tiny_models.build_model("sd15")


def with_sampling(model, sampling_cls, prediction_cls, **settings):
    """A clone of ``model`` sampling with another ModelSampling (as ComfyUI's ModelSampling* nodes do)."""

    class Sampling(sampling_cls, prediction_cls):
        pass

    class Config:
        sampling_settings = settings

    patched = model.clone()
    patched.add_object_patch("model_sampling", Sampling(Config()))
    return patched


@pytest.mark.parametrize("text,expected", [
    ("999,749,499,249", [999, 749, 499, 249]),
    (" 999, 749 ,499,249 ", [999, 749, 499, 249]),
    ("999 749 499 249", [999, 749, 499, 249]),
    ("999;500", [999, 500]),
    ("399", [399]),
    ("0", [0]),
    ("+10,3", [10, 3]),
])
def test_parse_accepts_integer_lists(text, expected):
    assert parse_timesteps(text) == expected
    assert parse_timesteps(text, table_size=1000) == expected


@pytest.mark.parametrize("text,message", [
    ("", "empty"),
    ("  , ,", "empty"),
    ("999,749.5,249", "'749.5' is not an integer"),
    ("999,abc", "'abc' is not an integer"),
    ("1e3", "'1e3' is not an integer"),
    ("999,-1", "timestep -1 is outside"),
    ("999,499,499,249", "timestep 499 appears twice"),
    ("249,499,749,999", "strictly descending"),
    ("999,249,499", "249 is followed by 499"),
])
def test_parse_rejects_bad_lists_clearly(text, message):
    with pytest.raises(ScheduleError, match=message):
        parse_timesteps(text)


def test_parse_rejects_timesteps_past_the_table():
    with pytest.raises(ScheduleError, match=r"timestep 1000 is outside 0\.\.999 \(the model's sigma table has 1000 entries\)"):
        parse_timesteps("1000,500", table_size=1000)
    assert parse_timesteps("1000,500", table_size=1001) == [1000, 500]


def test_schedule_error_is_a_value_error():
    assert issubclass(ScheduleError, ValueError)
    assert issubclass(UnsupportedModelError, ScheduleError)


def test_presets_hold_the_dmd2_timesteps():
    assert PRESETS["4-step (999,749,499,249)"] == (999, 749, 499, 249)
    assert PRESETS["1-step (399)"] == (399,)
    assert PRESETS["custom"] is None
    names = list(PRESETS)
    assert names[:2] == ["4-step (999,749,499,249)", "1-step (399)"] and names[-1] == "custom"  # DMD2 first
    assert len(names) == len(set(names)) > 3  # then the other release families (tests/test_families.py)


@pytest.mark.parametrize("timesteps", [[999, 749, 499, 249], [399], [999, 500, 1]])
def test_sigmas_are_the_models_table_entries(sd15, timesteps):
    model_sampling = sd15.get_model_object("model_sampling")
    sigmas = sigmas_for_timesteps(model_sampling, timesteps)
    assert sigmas.shape == (len(timesteps) + 1,)
    assert sigmas[-1] == 0
    table = model_sampling.sigmas
    for sigma, t in zip(sigmas[:-1], timesteps):
        assert sigma == table[t]
        # ComfyUI maps the sigma back to exactly this timestep when it calls the UNet
        assert int(model_sampling.timestep(sigma)) == t


def test_sigmas_match_the_ddpm_formula(sd15):
    """Independent check of the table: SD's scaled-linear betas, sigma = sqrt((1-abar)/abar)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    abar = torch.cumprod(1 - betas, 0)
    expected = ((1 - abar) / abar).sqrt()[[999, 749, 499, 249]].float()
    got = schedule_sigmas(sd15, "4-step (999,749,499,249)", "")[:-1]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=0)
    assert got[0] == pytest.approx(14.6146, abs=1e-3)


def test_schedule_presets_and_custom(sd15):
    table = sd15.get_model_object("model_sampling").sigmas
    four = schedule_sigmas(sd15, "4-step (999,749,499,249)", "ignored,garbage")
    assert torch.equal(four, torch.cat([table[[999, 749, 499, 249]], torch.zeros(1)]))
    one = schedule_sigmas(sd15, "1-step (399)", "")
    assert torch.equal(one, torch.stack([table[399], torch.tensor(0.0)]))
    custom = schedule_sigmas(sd15, "custom", "999, 499")
    assert torch.equal(custom, torch.cat([table[[999, 499]], torch.zeros(1)]))


def test_schedule_reads_the_connected_models_table(sd15):
    """A patched sigma table (zero terminal SNR) changes the sigmas: they are not hard-coded."""
    zsnr = with_sampling(sd15, comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.EPS, zsnr=True)
    sigmas = schedule_sigmas(zsnr, "4-step (999,749,499,249)", "")
    table = zsnr.get_model_object("model_sampling").sigmas
    assert torch.equal(sigmas[:-1], table[[999, 749, 499, 249]])
    assert sigmas[0] > 100  # zsnr's last entry is huge, the default one is 14.6


def test_schedule_errors_name_the_problem(sd15):
    with pytest.raises(ScheduleError, match="outside 0..999"):
        schedule_sigmas(sd15, "custom", "1500,999")
    with pytest.raises(ScheduleError, match="strictly descending"):
        schedule_sigmas(sd15, "custom", "249,999")
    with pytest.raises(ScheduleError, match="unknown preset"):
        schedule_sigmas(sd15, "8-step", "")


def test_v_prediction_is_supported(sd15):
    vpred = with_sampling(sd15, comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.V_PREDICTION)
    sigmas = schedule_sigmas(vpred, "1-step (399)", "")
    assert sigmas[0] == vpred.get_model_object("model_sampling").sigmas[399]


@pytest.mark.parametrize("sampling_cls,prediction_cls,what", [
    (comfy.model_sampling.ModelSamplingDiscreteFlow, comfy.model_sampling.CONST, "discrete SD-style timestep table"),
    (comfy.model_sampling.ModelSamplingContinuousEDM, comfy.model_sampling.EDM, "discrete SD-style timestep table"),
    (comfy.model_sampling.ModelSamplingDiscrete, comfy.model_sampling.CONST, "x = x0 \\+ sigma\\*noise"),
])
def test_other_samplings_are_refused(sd15, sampling_cls, prediction_cls, what):
    other = with_sampling(sd15, sampling_cls, prediction_cls)
    with pytest.raises(UnsupportedModelError, match=what):
        schedule_sigmas(other, "4-step (999,749,499,249)", "")


@pytest.mark.parametrize("sampling,zsnr,supported", [
    ("eps", False, True), ("eps", True, True), ("v_prediction", True, True), ("x0", False, True),
    ("lcm", False, False),  # snaps timesteps to a 50-step grid (749 -> 739)
    ("img_to_img", False, False),
])
def test_stock_model_sampling_node_variants(sd15, sampling, zsnr, supported):
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete

    patched = ModelSamplingDiscrete().patch(sd15, sampling, zsnr)[0]
    if supported:
        sigmas = schedule_sigmas(patched, "4-step (999,749,499,249)", "")
        assert torch.equal(sigmas[:-1], patched.get_model_object("model_sampling").sigmas[[999, 749, 499, 249]])
    else:
        with pytest.raises(UnsupportedModelError):
            schedule_sigmas(patched, "4-step (999,749,499,249)", "")


def test_schedule_node(sd15):
    out = schedules.DMD2Schedule.execute(sd15, "custom", "999,749,499,249")
    assert torch.equal(out.result[0], schedule_sigmas(sd15, "4-step (999,749,499,249)", ""))
    with pytest.raises(ScheduleError, match="not an integer"):
        schedules.DMD2Schedule.execute(sd15, "custom", "999,x")


def test_schedule_node_schema():
    schema = schedules.DMD2Schedule.define_schema()
    assert schema.node_id == "DMD2Schedule" and schema.category == "DMD2/sampling"
    assert [i.id for i in schema.inputs] == ["model", "preset", "custom_timesteps"]
    assert all(i.tooltip for i in schema.inputs)
    assert schema.inputs[1].options == list(PRESETS)
    assert schedules.NODE_CLASSES == [schedules.DMD2Schedule]


def test_submit_time_validation_checks_only_custom_text():
    validate = schedules.DMD2Schedule.validate_inputs
    assert validate("custom", "999,749") is True
    assert "strictly descending" in validate("custom", "1,2")
    assert validate("4-step (999,749,499,249)", "not used") is True
