"""Input checks and request preparation shared by both fidelities.

Both simulators must reject (or repair) exactly the same bad inputs, so the rules live here once:
:func:`check_deployment` for a deployment against the cluster and model, :func:`prepare_requests` for
the trace's per-request token counts against the model's context limit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from opscale.sim.deployment import Deployment
from opscale.sim.hardware import ClusterSpec, get_gpu
from opscale.sim.models import ModelSpec, get_model


def check_deployment(deployment: Deployment, cluster: ClusterSpec, model: ModelSpec) -> None:
    """Validate ``deployment`` for a simulator of ``model`` on ``cluster``.

    :raises ValueError: a missing or foreign unit, a deployment for another model or GPU type, a
        replica placed on a GPU that does not exist, or more model-level GPUs than the cluster has.
    """
    deployment.validate(gpus_per_node=cluster.nodes[0].gpus_per_node)
    if get_model(deployment.model).name != model.name:
        raise ValueError(f"deployment is for model {deployment.model!r}, the simulator for {model.name!r}")
    cluster_types = {node.gpu.name for node in cluster.nodes}
    if get_gpu(deployment.gpu).name not in cluster_types:
        raise ValueError(
            f"deployment is for GPU {deployment.gpu!r}; the cluster has {', '.join(sorted(cluster_types))}"
        )
    for unit, config in deployment.units.items():
        for group in config.gpus or []:
            for index in group:
                if not 0 <= index < cluster.num_gpus:
                    raise ValueError(
                        f"unit {unit.value!r} replica placed on GPU {index}, which does not exist; "
                        f"the cluster has GPUs 0..{cluster.num_gpus - 1}"
                    )
    needed = deployment.instances * deployment.tp * deployment.pp
    if deployment.granularity == "model" and needed > cluster.num_gpus:
        raise ValueError(
            f"{deployment.instances} instances of {deployment.tp * deployment.pp} GPUs need "
            f"{needed} GPUs; the cluster has {cluster.num_gpus}"
        )


@dataclass(frozen=True)
class PreparedRequests:
    """Per-request token counts as the simulators serve them.

    :param prompt: prompt tokens, image tokens included for vision-language models.
    :param patches: vision-encoder input patches per request (0 without images).
    :param clipped: requests clipped to the context limit (``SimConfig.clip_long_requests``).
    """

    arrival_s: np.ndarray
    prompt: np.ndarray
    output: np.ndarray
    patches: np.ndarray
    clipped: int

    @property
    def max_request_tokens(self) -> int:
        return int((self.prompt + self.output).max()) if self.prompt.size else 0


def prepare_requests(trace: object, model: ModelSpec, *, clip_long_requests: bool) -> PreparedRequests:
    """Token counts of ``trace`` (a :class:`opscale.traces.RequestTrace`) checked against ``model``.

    :raises ValueError: a request longer than the model's context limit, unless
        ``clip_long_requests`` (then its output, then its prompt, is cut to fit and it is counted).
    """
    arrival = np.asarray(trace.arrival_s, dtype=np.float64)  # type: ignore[attr-defined]
    prompt = np.asarray(trace.prompt_tokens, dtype=np.int64).copy()  # type: ignore[attr-defined]
    output = np.asarray(trace.output_tokens, dtype=np.int64).copy()  # type: ignore[attr-defined]
    image = getattr(trace, "image_tokens", None)
    patches = np.zeros_like(prompt)
    if image is not None and model.vision is not None:
        # image tokens join the prompt; the encoder sees merge_factor patches per image token
        image = np.asarray(image, dtype=np.int64)
        prompt = prompt + image
        patches = image * model.vision.merge_factor
    limit = model.max_context
    too_long = np.flatnonzero(prompt + output > limit)
    if too_long.size:
        if not clip_long_requests:
            i = int(too_long[0])
            raise ValueError(
                f"request {i} needs {int(prompt[i])} prompt + {int(output[i])} output = "
                f"{int(prompt[i] + output[i])} tokens, above the context limit {limit} of model "
                f"{model.name!r} ({too_long.size} such requests; SimConfig.clip_long_requests (CLI: --clip-long) "
                "clips them, counted)"
            )
        output[too_long] = np.minimum(output[too_long], limit - 1)
        prompt[too_long] = limit - output[too_long]
    return PreparedRequests(arrival, prompt, output, patches, int(too_long.size))
