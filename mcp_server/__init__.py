"""realign_mcp: the MCP server over the realign library (thin adapter)."""
