"""cocotb testbenches of the generated RTL, driven by pytest through cocotb_tools.runner."""
