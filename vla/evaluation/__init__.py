"""`vla.evaluation`: closed-loop evaluation of a policy in simulation (`vla eval`, evaluation
during training, `vla bench eval`).

- ``evaluate``    ``run_evaluation`` (rollouts through ``vla.envs.rollout`` with statistics and
  video recorders), Wilson intervals, the summary table, videos, the chart, ``eval_info.json``
- ``checkpoint``  ``evaluate_checkpoint``: the periodic evaluation the training loop runs

It sits above the core and the policies; nothing in the core imports it.
"""

from vla.evaluation.evaluate import (
    EpisodeRecords,
    VideoRecorder,
    format_table,
    plot_success_chart,
    render_frame,
    run_evaluation,
    summarize,
    wilson_interval,
    write_outputs,
    write_video,
)

__all__ = [
    "EpisodeRecords",
    "VideoRecorder",
    "format_table",
    "plot_success_chart",
    "render_frame",
    "run_evaluation",
    "summarize",
    "wilson_interval",
    "write_outputs",
    "write_video",
]
