"""Hardware definitions: parameters, packed weight formats, ISA and the Amaranth RTL."""
