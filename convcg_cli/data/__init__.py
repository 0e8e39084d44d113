"""The data layer, in the order the data travels: contract -> importing -> features -> loading."""
