"""Each vendor's piece of the tools (``tools.vendors.VendorTools`` and its image decoders)."""
