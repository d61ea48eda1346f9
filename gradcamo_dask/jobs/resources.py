"""One site per GPU: site tasks ask for the worker resource ``GPU=1`` whenever workers advertise GPUs.

GPU workers run several Dask threads (jobqueue and the Helm chart start 8 for the
crops' Zarr reads), so without a restriction up to 8 site tasks would share one GPU
and its memory. Every GPU worker gradcamo-dask starts or documents advertises
``--resources GPU=1`` (LocalCUDACluster, SLURM, Kubernetes, Helm); Dask's scheduler
then runs at most one task restricted to ``{"GPU": 1}`` per worker at a time.
"""

from __future__ import annotations

from typing import Any

__all__ = ["GPU_RESOURCE", "restrict_sites_to_gpus", "site_resources"]

#: The worker resource a GPU worker advertises and a site task asks one unit of.
GPU_RESOURCE = "GPU"


def site_resources(client: Any = None) -> dict[str, float] | None:
    """``{"GPU": 1}`` when a worker of ``client`` advertises ``GPU``, else None (CPU clusters).

    ``client=None`` uses the current distributed client, if any; Dask's local
    schedulers have no resources (None).
    """
    if client is None:
        try:
            from distributed import default_client

            client = default_client()
        except (ImportError, ValueError):
            return None
    workers = client.scheduler_info(n_workers=-1).get("workers", {})
    if any(float((info.get("resources") or {}).get(GPU_RESOURCE, 0)) > 0 for info in workers.values()):
        return {GPU_RESOURCE: 1}
    return None


def restrict_sites_to_gpus(graph: Any, layer: str, client: Any = None) -> Any:
    """``graph`` with the tasks of ``layer`` asking for one GPU each when the workers have GPUs.

    Equivalent to building ``layer`` inside ``dask.annotate(resources={"GPU": 1})``;
    done afterwards so that the graph builder needs one line, not a re-indented block.

    Parameters
    ----------
    graph : dask.highlevelgraph.HighLevelGraph
        Holds the site tasks in layer ``layer``.
    client : distributed.Client, optional
        Decides through :func:`site_resources`.

    Returns
    -------
    HighLevelGraph
        ``graph`` itself on CPU clusters; otherwise a copy whose ``layer`` carries
        the annotation ``resources={"GPU": 1}`` (other layers unchanged).
    """
    from dask.highlevelgraph import HighLevelGraph, MaterializedLayer

    resources = site_resources(client)
    if resources is None:
        return graph
    old = graph.layers[layer]
    annotations = {**(old.annotations or {}), "resources": resources}
    new = MaterializedLayer(dict(old), annotations=annotations)
    return HighLevelGraph({**graph.layers, layer: new}, dict(graph.dependencies))
