"""Generated from proto/halb/v1 by halb.protogen; do not edit."""
