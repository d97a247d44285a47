"""The TCP collectives between four Dask worker processes, one CommActor rank per worker."""

import pytest

from daskllm.comm.testing import OPS

pytestmark = pytest.mark.cluster

WORLD = 4


@pytest.fixture(scope="module")
def actors():
    """Four connected CommActors on a 4-process LocalCluster, closed after the module."""
    from distributed import Client, LocalCluster

    from daskllm.comm.testing import CommActor

    with LocalCluster(
        n_workers=WORLD, threads_per_worker=1, processes=True, dashboard_address=None, host="127.0.0.1"
    ) as cluster, Client(cluster, direct_to_workers=True) as client:
        workers = sorted(client.scheduler_info()["workers"])
        assert len(workers) == WORLD
        ranks = [
            client.submit(CommActor, r, WORLD, 20.0, workers=[w], actor=True, pure=False).result()
            for r, w in enumerate(workers)
        ]
        addresses = dict(enumerate(a.listen().result() for a in ranks))
        assert all(f.result() for f in [a.connect(addresses) for a in ranks])
        yield ranks
        for a in ranks:
            a.close().result()


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("shape,dtype", [((6, 5), "float32"), ((3, 1000), "int64")])
def test_collective_on_every_rank(actors, op, shape, dtype):
    futures = [a.check(op, shape, dtype, 7) for a in actors]
    assert [f.result() for f in futures] == [True] * WORLD


def test_large_all_reduce_split_path(actors):
    futures = [a.check("all_reduce", (512, 1024), "float32", 1) for a in actors]  # 2 MiB per rank
    assert [f.result() for f in futures] == [True] * WORLD


def test_timing_reports_stats(actors):
    results = [f.result() for f in [a.run("all_reduce", 8192, 3, 1) for a in actors]]
    for r in results:
        assert len(r["seconds"]) == 3 and r["stats"]["all_reduce"]["calls"] >= 4
