"""`eager_load` on a server whose StreamLoader RAM budget is smaller than the checkpoint:
the loader falls back to lazy reads, says so on the node, and the run still succeeds."""
import pytest
from server_helpers import LOADER_NODE, disk_read, image_digest, rerun, sd15_prompt, stats, ui_text

pytestmark = pytest.mark.server

BUDGET_GIB = 0.125  # the tiny checkpoint holds about 0.33 GiB
FALLBACK = "`eager_load` fell back to lazy reads"


@pytest.fixture(scope="module")
def small_ram_server(start_server, comfy_path, models_dir):
    with start_server(comfy_path, models_dir, env={"STREAMLOADER_RAM_BUDGET_GB": str(BUDGET_GIB)}) as server:
        yield server


def test_eager_load_beyond_the_ram_budget_falls_back_to_lazy_and_says_so(small_ram_server, server):
    assert stats(small_ram_server)["ram_budget_bytes"] == int(BUDGET_GIB * 2**30)
    read, record = disk_read(small_ram_server, sd15_prompt(eager_load=True))
    notes = ui_text(record, LOADER_NODE)
    assert any(n.startswith(FALLBACK) and "STREAMLOADER_RAM_BUDGET_GB" in n for n in notes), notes
    assert "(reads on first use)" in notes[0], "the loader claims the file was read eagerly"
    assert FALLBACK in small_ram_server.log_tail(200), "no warning in the server log"
    assert read > 0
    reference = image_digest(server, rerun(server, sd15_prompt()))
    assert image_digest(small_ram_server, record) == reference, "the lazy fallback changed the pixels"


def test_a_lazy_load_on_the_same_server_has_no_fallback_note(small_ram_server):
    record = rerun(small_ram_server, sd15_prompt(eager_load=False))
    assert not any(FALLBACK in n for n in ui_text(record, LOADER_NODE))
