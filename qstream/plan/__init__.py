"""Headers + config + options -> :class:`.plan.Plan`, reading no tensor data: the operations
(:mod:`.ops`), the planner (:mod:`.plan`) and its checks and warnings (:mod:`.checks`)."""
