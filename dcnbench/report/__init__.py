"""Reporting: the paper's numbers (:mod:`.paper`), tables beside ours (:mod:`.tables`), figures
(:mod:`.figures`) and the regression gate of reproduced numbers (:mod:`.check`)."""
