#!/bin/sh
# Stand-in for ssh as OpenMPI's launch agent (mpirun --mca plm_rsh_agent THIS_FILE), used by the
# data-parallel tests (tests/unit/test_dist_train.cpp) to make two "hosts" out of two network
# namespaces on one machine.
#
# OpenMPI calls the agent as ssh would be called:  AGENT [OPTIONS...] HOST COMMAND...
# where COMMAND is a shell command line (environment settings, then the orted daemon with its
# quoted arguments) that ssh would hand to the remote shell. We run that line with /bin/sh inside
# the network namespace that stands for HOST.
#
# SUBLLM_NETNS_HOSTS maps hosts to namespaces: space-separated ADDRESS=NAMESPACE pairs, e.g.
#   SUBLLM_NETNS_HOSTS="10.213.7.1=subllm_h0_42 10.213.7.2=subllm_h1_42"
# SUBLLM_NETNS_AGENT_LOG, if set, is a file that gets one line "HOST NAMESPACE" per launch.
set -eu

# Options ssh would take (OpenMPI adds -x for ssh-like agents): none of them matter here.
while [ $# -gt 0 ]; do
  case "$1" in
    -*) shift ;;
    *) break ;;
  esac
done
if [ $# -lt 2 ]; then
  echo "netns_mpi_agent.sh: usage: $0 [OPTIONS] HOST COMMAND..." >&2
  exit 255
fi
host=$1
shift

ns=
for pair in ${SUBLLM_NETNS_HOSTS:-}; do
  if [ "${pair%%=*}" = "$host" ]; then ns=${pair#*=}; fi
done
if [ -z "$ns" ]; then
  echo "netns_mpi_agent.sh: no namespace for host '$host' in SUBLLM_NETNS_HOSTS='${SUBLLM_NETNS_HOSTS:-}'" >&2
  exit 255  # ssh's status for a connection failure
fi

# For the test to see which hosts were started through us (optional).
if [ -n "${SUBLLM_NETNS_AGENT_LOG:-}" ]; then echo "$host $ns" >>"$SUBLLM_NETNS_AGENT_LOG"; fi

# ssh joins its arguments with spaces and gives them to the remote shell; so do we.
exec ip netns exec "$ns" /bin/sh -c "$*"
