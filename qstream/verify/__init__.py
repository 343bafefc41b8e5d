"""``qstream verify``: read an output back (:mod:`.verify`), resolve each module to its config
group (:mod:`.rules`, ModelOpt in :mod:`.modelopt`), decode and measure against the source
(:mod:`.measure`), report (:mod:`.report`)."""
