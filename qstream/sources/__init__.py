"""Where a conversion reads from: a local folder (:mod:`.checkpoint`) or a Hub repo
(:mod:`.hub_source`), opened by :func:`.source.open_checkpoint`; and the source encodings
found from the headers: FP8 weights with their scales (:mod:`.fp8`), ModelOpt NVFP4
(:mod:`.modelopt`)."""
