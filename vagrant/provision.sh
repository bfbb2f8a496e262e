#!/usr/bin/env bash
# Provisioning of one VM of the Vagrant lab, run as root by Vagrant (see Vagrantfile):
#
#   provision.sh base                                  packages, the package, the service unit
#   provision.sh lab PEER TOPOLOGY ENCRYPTION QUEUES   this VM's lab config and network, then
#                                                      (re)start nfq-ipsec@lab
#
# Nothing here is specific to Vagrant but the paths: the repository (NFQ_IPSEC_REPO, /vagrant)
# and where the seed was uploaded (NFQ_IPSEC_SEED_UPLOAD, /tmp/nfq-ipsec-lab.seed). The steps
# are the project's own: scripts/install-service, `python -m nfq_ipsec_lab.lab.vm setup` (the same
# code the namespace test runs, tests/lab/test_vagrant.py) and systemctl.
set -euo pipefail

repo=${NFQ_IPSEC_REPO:-/vagrant}
venv=${NFQ_IPSEC_VENV:-/opt/nfq-ipsec/venv}
seed_upload=${NFQ_IPSEC_SEED_UPLOAD:-/tmp/nfq-ipsec-lab.seed}
etc=/etc/nfq-ipsec
instance=lab

usage() {
    sed -n '2,7p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

step=${1:-}
case $step in
    base)
        [[ $# -eq 1 ]] || usage
        "$repo/scripts/install-service" --venv "$venv"
        ;;
    lab)
        [[ $# -eq 5 ]] || usage
        peer=$2 topology=$3 encryption=$4 queues=$5
        install -d -m 0700 "$etc"
        if [[ -f "$seed_upload" ]]; then
            install -m 0600 -o root -g root "$seed_upload" "$etc/$instance.seed"
            rm -f "$seed_upload"
        fi
        "$venv/bin/python" -m nfq_ipsec_lab.lab.vm setup --peer "$peer" --topology "$topology" \
            --encryption "$encryption" --queues "$queues" --seed-file "$etc/$instance.seed" \
            --instance "$instance"
        systemctl enable "nfq-ipsec@$instance.service"
        # A clean stop of the old daemon (its rules stay, closed), then the new one, which
        # replaces them; returns once the new rules are in (the unit's ExecStartPost).
        systemctl restart "nfq-ipsec@$instance.service"
        "$venv/bin/nfq-ipsec" status --config "$etc/$instance.toml"
        ;;
    *)
        usage
        ;;
esac
