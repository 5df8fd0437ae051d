"""The per-tenant registry of runs and checkpoints."""
from __future__ import annotations

from twinkle.server.store import MAX_SNAPSHOTS_PER_RUN, TenantStore


def test_sampling_snapshots_are_bounded_per_run_and_survive_a_reload(tmp_path):
    store = TenantStore(tmp_path)
    folders = []
    for i in range(MAX_SNAPSHOTS_PER_RUN + 3):
        ckpt_id = f'snap{i:03d}'
        folder = tmp_path / 'checkpoints' / ckpt_id
        folder.mkdir(parents=True)
        (folder / 'adapter_model.safetensors').write_bytes(b'x' * 10)
        store.add_checkpoint(ckpt_id, 'run1', 'snapshot', f'snap-{i}', folder)
        folders.append(folder)
    folder = tmp_path / 'checkpoints' / 'w1'
    folder.mkdir(parents=True)
    store.add_checkpoint('w1', 'run1', 'weights', 'final', folder)
    snaps = [c for c in store.checkpoints.values() if c['kind'] == 'snapshot']
    assert len(snaps) == MAX_SNAPSHOTS_PER_RUN
    assert [f.exists() for f in folders] == [False] * 3 + [True] * MAX_SNAPSHOTS_PER_RUN
    assert store.find('run1', 'weights', 'final') is not None  # user checkpoints are never pruned
    reloaded = TenantStore(tmp_path)
    assert sorted(reloaded.checkpoints) == sorted(store.checkpoints)


def test_leftovers_of_interrupted_saves_are_removed_at_start(tmp_path):
    from twinkle.server.store import Store
    root = tmp_path / 'tenants' / 't1'
    store = TenantStore(root)
    checkpoints = root / 'checkpoints'
    kept = checkpoints / 'kept'
    kept.mkdir(parents=True)
    (kept / 'adapter_model.safetensors').write_bytes(b'x')
    store.add_checkpoint('kept', 'run1', 'weights', 'final', kept)
    # A crash mid-save: a temporary folder, a finished folder never registered, a registry temp file, and a
    # registered checkpoint that was renamed aside and never replaced.
    (checkpoints / '.abc.tmp-123').mkdir()
    (checkpoints / '.abc.tmp-123' / 'part').write_bytes(b'y')
    (checkpoints / 'unrecorded').mkdir()
    (root / '.registry-0123.tmp').write_text('{}')
    moved = checkpoints / 'moved'
    moved.mkdir()
    store.add_checkpoint('moved', 'run1', 'weights', 'other', moved)
    moved.rename(checkpoints / '.moved.old-99')
    assert Store(tmp_path).clean_interrupted() == 3
    assert sorted(p.name for p in checkpoints.iterdir()) == ['kept', 'moved']
    assert not (root / '.registry-0123.tmp').exists() and (kept / 'adapter_model.safetensors').exists()


def test_a_change_writes_only_its_runs_small_file(tmp_path):
    import json
    store = TenantStore(tmp_path)
    store.add_run('s1:train:0', {'kind': 'tinker', 'user_metadata': {'note': 'x' * 1000}})
    store.add_run('s2:train:0', {'kind': 'tinker'})
    files = sorted((tmp_path / 'runs').glob('*.json'))
    assert len(files) == 2
    before = {f: f.read_text() for f in files}
    folder = tmp_path / 'checkpoints' / 'c1'
    folder.mkdir(parents=True)
    store.add_checkpoint('c1', 's2:train:0', 'weights', 'w', folder)
    changed = [f for f in files if f.read_text() != before[f]]
    assert len(changed) == 1 and 'c1' in json.loads(changed[0].read_text())['checkpoints']
    reloaded = TenantStore(tmp_path)
    assert reloaded.runs == store.runs and reloaded.checkpoints == store.checkpoints
    store.delete_checkpoint(store.checkpoints['c1'])
    assert TenantStore(tmp_path).checkpoints == {}


def test_the_single_file_registry_of_earlier_versions_is_read_and_split(tmp_path):
    import json
    run = {'run_id': 'r1', 'created': 't', 'last_request_time': 't', 'kind': 'twinkle'}
    ckpt = {'checkpoint_id': 'c1', 'run_id': 'r1', 'kind': 'weights', 'name': 'n', 'time': 't'}
    (tmp_path / 'registry.json').write_text(json.dumps({'runs': {'r1': run}, 'checkpoints': {'c1': ckpt}}))
    store = TenantStore(tmp_path)
    assert store.runs == {'r1': run} and store.checkpoints == {'c1': ckpt}
    assert not (tmp_path / 'registry.json').exists()
    assert TenantStore(tmp_path).find('r1', 'weights', 'n') == ckpt
