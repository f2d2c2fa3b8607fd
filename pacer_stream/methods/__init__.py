"""Merge methods: how N aligned copies of one tensor become one."""
