"""After (and while) the shards are written: the Hub push (:mod:`.hub`) and the model card
(:mod:`.card`)."""
