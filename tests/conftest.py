import pytest

from tests import models


@pytest.fixture(scope="session")
def tiny():
    """tiny(kind) -> (diffusers folder, fp32 OpenVINO folder), built and converted once."""

    def get(kind: str, weight_format: str = "fp32"):
        return models.source_dir(kind), models.ov_dir(kind, weight_format)

    return get


# The fast tier, `pytest -m "not slow"` (under 2 minutes here with the tiny models built): one text2img parity
# case, the schedulers, the RNG, the parameter checks and the CLI's bad-input handling. Everything not listed
# here is marked slow; `make test` runs both tiers. A module maps to "*" (all its tests) or to test names.
FAST: dict[str, str | set[str]] = {
    "test_schedulers.py": "*",
    "test_schedulers_api.py": "*",
    "test_rng.py": "*",
    "test_model_cache.py": "*",  # its multi-process race test marks itself slow
    "test_text2img.py": {"test_text2img_parity[negative-given]"},
    "test_generate_cli.py": {"test_bad_inputs"},
    "test_pipeline_api.py": {"test_parameters_are_validated_once", "test_parameters_are_typed_and_frozen"},
    "test_torch_free.py": {"test_imports_are_torch_free", "test_base_import_path_has_no_extras"},
    "test_batch.py": {"test_bad_lines_fail_before_any_work", "test_bad_flags"},
    "test_serve.py": {"test_bad_requests_get_a_4xx_with_a_reason"},  # a live server; one-line 4xx reasons
    "test_prompts.py": {"test_a1111_translation", "test_bad_syntax_is_one_line_error", "test_bad_syntax_options"},
}


# Under pytest-xdist (`-n 2 --dist loadgroup`, what `make test` runs) a module's tests stay on one worker, so its
# module-scoped fixtures (a converted folder, a live server) are made once; the modules that start a Ray cluster
# share one worker, so that two clusters never run at once.
XDIST_GROUPS = {"test_batch.py": "ray", "test_serve_ray.py": "ray"}


# The modules that take longest (from `--durations` on a fresh clone) are handed out first, so that neither worker
# is left alone with a long module at the end.
FIRST = ("test_quantize.py", "test_lora.py", "test_vae.py", "test_convert.py", "test_batch.py", "test_serve_ray.py",
         "test_python_versions.py", "test_inpaint.py", "test_single_file.py", "test_conditioning.py")  # fmt: skip


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: FIRST.index(item.path.name) if item.path.name in FIRST else len(FIRST))  # stable
    for item in items:
        item.add_marker(pytest.mark.xdist_group(XDIST_GROUPS.get(item.path.name, item.path.name)))
        fast = FAST.get(item.path.name)
        name, base = item.name, item.name.split("[")[0]
        if not (fast == "*" or (isinstance(fast, set) and (name in fast or base in fast))):
            item.add_marker(pytest.mark.slow)
