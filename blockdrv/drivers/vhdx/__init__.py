"""VHDX format driver (being written)."""


class VHDXFormat:
    format_name = "vhdx"
    protocol_name = None


driver = VHDXFormat()
