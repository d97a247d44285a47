"""GPU workers: one worker per GPU, shards held as CuPy arrays.

Run: python cluster/gpu.py CHECKPOINT_DIR [N_GPUS]
Needs `pip install 'daskllm[gpu]' dask-cuda`. LocalCUDACluster pins each worker to one GPU
(CUDA_VISIBLE_DEVICES), so each rank uses its own device. Collectives between ranks go over
TCP through host memory in this version (an NCCL backend would slot in behind the same
Communicator interface).
"""
import sys

from distributed import Client


def main(model, n_gpus=1):
    from dask_cuda import LocalCUDACluster

    from daskllm import LLM
    with LocalCUDACluster(n_workers=n_gpus) as cluster, Client(cluster, direct_to_workers=True) as client:
        with LLM(model, tp=n_gpus, device="cuda", client=client) as llm:
            print(llm.generate("Hello", max_new_tokens=16)[0].text)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else 1)
