/* Keeps the CLI helper library non-empty before any common_*.c exists. */
typedef int dm_cli_common_stub;
