"""Data: synthetic CT phantom (:mod:`.phantom`), raw dataset sources (:mod:`.sources`), validation
(:mod:`.validation`), preprocessing into 3-slice samples and the torch dataset.

Submodules are imported explicitly (``from unet3plus.data.sources import discover_cases``) so that
importing the package stays cheap.
"""
