"""The engine: the Plan of work items (every check happens while planning) and the one executor that
streams blocks through the registered methods into the writer."""
