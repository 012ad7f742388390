"""What the tests share: the servers they connect to, processes and servers they own, builders."""
