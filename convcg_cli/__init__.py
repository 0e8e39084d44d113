"""convcg: conversion-optimised two-tower candidate generation, trained from one CLI."""

__version__ = "0.1.0"
