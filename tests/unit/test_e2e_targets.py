"""bench/e2e_bench.py's check of issue 9's end-to-end targets, on rows made up to pass or miss each one."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "bench"))

import e2e_bench  # noqa: E402

GIB = 2**30


def row(config, run, s_per_step, peak_gib, loader="pack", stream=False, disk=0, device_gib=None):
    return {"config": config, "run": run, "loader": loader, "stream": stream, "s_per_step": s_per_step,
            "disk_bytes": disk, "pack_disk_bytes": disk, "checkpoint_read_bytes": disk,
            "peak_vram_bytes": int(peak_gib * GIB),
            "peak_device_used_bytes": None if device_gib is None else int(device_gib * GIB)}


CORE = [row("core default", "warm", 0.10, 9, loader="core"), row("core legacy 4 GiB", "warm", 0.30, 5, loader="core")]


def test_warm_rows_must_read_nothing_and_keep_up_with_core():
    ok = e2e_bench.targets([*CORE, row("pack lazy", "warm", 0.099, 9)])
    assert ok["pack_warm_reads_nothing"] and ok["pack_warm_no_slower_than_core_warm"]
    missed = e2e_bench.targets([*CORE, row("pack lazy", "warm", 0.12, 9, disk=4096)])
    assert not missed["pack_warm_reads_nothing"] and not missed["pack_warm_no_slower_than_core_warm"]


def test_reads_of_other_files_do_not_count_as_reading_the_model():
    """The H200's warm row read 8 MB in the server process (modules, images) and 0 of the checkpoint."""
    other = {**row("pack lazy", "warm", 0.099, 9), "disk_bytes": 8_052_736}
    assert e2e_bench.targets([*CORE, other])["pack_warm_reads_nothing"]
    model = {**row("pack lazy", "warm", 0.099, 9), "checkpoint_read_bytes": 4096}
    assert not e2e_bench.targets([*CORE, model])["pack_warm_reads_nothing"]


def test_cached_bytes_sees_a_read_after_the_pages_were_dropped(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(os.urandom(1 << 20))
    e2e_bench.drop_page_cache(str(path))
    before = e2e_bench.cached_bytes(str(path))
    with open(path, "rb") as f:
        f.read(256 << 10)
    assert e2e_bench.cached_bytes(str(path)) - before >= 256 << 10


def test_a_streamed_row_is_compared_with_core_rows_at_equal_or_higher_peak_only():
    fast = row("pack streamed 2 GiB", "warm", 0.25, 4, stream=True)  # beats legacy (5 GiB), not default (9 GiB)
    assert e2e_bench.targets([*CORE, fast])["streamed_faster_than_core_at_equal_or_higher_peak"] == {
        "pack streamed 2 GiB warm": False}
    lean = row("pack streamed 2 GiB", "warm", 0.25, 4, stream=True)
    core = [row("core legacy 4 GiB", "warm", 0.30, 5, loader="core"), row("core default", "warm", 0.1, 3, loader="core")]
    assert e2e_bench.targets(core + [lean])["streamed_faster_than_core_at_equal_or_higher_peak"] == {
        "pack streamed 2 GiB warm": True}


def test_the_devices_own_peak_counts_where_there_is_one():
    """DynamicVRAM's weights are outside torch's peak: core's 1 GiB torch peak is 9 GiB on the device."""
    core = [row("core default", "warm", 0.1, 1, loader="core", device_gib=9)]
    streamed = row("pack streamed 2 GiB", "warm", 0.25, 4, stream=True, device_gib=4.5)
    assert e2e_bench.targets(core + [streamed])["streamed_faster_than_core_at_equal_or_higher_peak"] == {
        "pack streamed 2 GiB warm": False}


def test_without_a_peak_or_a_rival_the_comparison_is_not_claimed():
    """On the CPU there is no peak; a streamed row above every core row's peak has no rival."""
    no_peaks = [{**r, "peak_vram_bytes": None} for r in CORE]
    streamed = row("pack streamed 2 GiB", "warm", 0.25, 4, stream=True)
    assert e2e_bench.targets(no_peaks + [{**streamed, "peak_vram_bytes": None}])[
        "streamed_faster_than_core_at_equal_or_higher_peak"] == {"pack streamed 2 GiB warm": None}
    above = row("pack streamed 12 GiB", "warm", 0.05, 12, stream=True)
    assert e2e_bench.targets(CORE + [above])["streamed_faster_than_core_at_equal_or_higher_peak"] == {
        "pack streamed 12 GiB warm": None}


def test_steps_are_counted_by_the_progress_value_not_by_the_events():
    """Upstream sends at most one progress event per 100 ms: steps of 0.105 s lose some."""
    progress = e2e_bench.Progress.__new__(e2e_bench.Progress)
    values = [1, 2, 4, 5, 7, 8, 10]  # steps 3, 6 and 9 sent no event
    progress.events = [(0.105 * (v - 1), {"node": "5", "value": v, "max": 10}) for v in values]
    progress.events.append((0.5, {"node": "9", "value": 1, "max": 1}))
    assert abs(progress.seconds_per_step("5") - 0.105) < 1e-9
    assert progress.seconds_per_step("7") is None


def test_a_streamed_row_is_held_to_the_resident_step():
    rows = [*CORE, row("pack lazy", "warm", 0.100, 9), row("pack eager", "warm", 0.104, 9),
            row("pack streamed 2 GiB", "warm", 0.104, 4, stream=True),
            row("pack streamed 2 GiB", "freed", 0.180, 4, stream=True)]
    assert e2e_bench.targets(rows)["streamed_within_5_percent_of_the_resident_step"] == {
        "pack streamed 2 GiB warm": True, "pack streamed 2 GiB freed": False}
