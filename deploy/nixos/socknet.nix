# services.socknet: the OpenFlow controller of this host's mesh and vmbr0 bridges.
#
# In the style of seed 004 (services.op-dbus with its stateConfig): the host's
# whole socknet configuration is one attribute set, rendered to
# /etc/socknet/host.yaml. Usage (see docs/operations.md, "NixOS"):
#
#   { config, pkgs, ... }:
#   {
#     imports = [ ./hardware-configuration.nix ./socknet.nix ];
#
#     services.socknet = {
#       enable = true;
#       hostConfig = {
#         host = "oo1424oo";
#         bridges = {
#           mesh = { name = "mesh"; uplinks = [ "vx-*" ]; to_socket = "to-socket"; };
#           socket = {
#             name = "vmbr0"; from_mesh = "from-mesh"; warp = "warp0";
#             privacy_ids = "100-199"; service_ids = "200-299";
#           };
#         };
#         containers = {
#           "100" = { mac = "02:00:00:00:01:00"; ip = "10.0.0.100/24"; };
#         };
#       };
#       policy = ./pmoves-tiers.yaml;   # or an attribute set, rendered to YAML
#       metrics.listen = "127.0.0.1:9464";
#     };
#   }
{ config, lib, pkgs, utils, ... }:

let
  cfg = config.services.socknet;
  yaml = pkgs.formats.yaml { };

  policyFile =
    if cfg.policy == null then null
    else if builtins.isAttrs cfg.policy then yaml.generate "socknet-policy.yaml" cfg.policy
    else cfg.policy;

  # What the module owns is set here; everything else comes from hostConfig.
  hostSettings = lib.recursiveUpdate cfg.hostConfig ({
    metrics = { enabled = cfg.metrics.enable; listen = cfg.metrics.listen; };
  } // lib.optionalAttrs (policyFile != null) {
    policy = "/etc/socknet/policy.yaml";
  });

  hostYaml = yaml.generate "socknet-host.yaml" hostSettings;

  metricsPort = lib.toInt (lib.last (lib.splitString ":" cfg.metrics.listen));

  wgDevice = lib.optional (cfg.wireguardInterface != null)
    "sys-subsystem-net-devices-${utils.escapeSystemdPath cfg.wireguardInterface}.device";

  socknet = "${cfg.package}/bin/socknet";
in
{
  options.services.socknet = {
    enable = lib.mkEnableOption "socknet, the OpenFlow controller of the mesh and vmbr0 bridges";

    package = lib.mkOption {
      type = lib.types.package;
      defaultText = lib.literalExpression "pkgs.socknet";
      default = pkgs.socknet;
      description = ''
        The socknet package (its `bin/socknet`). nixpkgs has none: build this
        repository with python3Packages.buildPythonApplication in an overlay.
      '';
    };

    hostConfig = lib.mkOption {
      type = yaml.type;
      default = { };
      example = lib.literalExpression ''
        {
          host = "oo1424oo";
          controller.listen = "tcp:127.0.0.1:6653";
          bridges = {
            mesh = { name = "mesh"; uplinks = [ "nm-privacy" ]; to_socket = "to-socket"; };
            socket = { name = "vmbr0"; from_mesh = "from-mesh"; warp = "warp0"; };
          };
        }
      '';
      description = ''
        host.yaml as Nix attributes (the README's host.yaml reference), rendered
        with pkgs.formats.yaml to /etc/socknet/host.yaml. `metrics` and `policy`
        are set from the options of the same name. The controller and the
        metrics endpoint listen on loopback unless this says otherwise.
      '';
    };

    policy = lib.mkOption {
      type = lib.types.nullOr (lib.types.either lib.types.path yaml.type);
      default = null;
      description = ''
        The tier policy: a policy.yaml file or its content as attributes.
        Installed as /etc/socknet/policy.yaml; a change reloads the running
        controller (SIGHUP), which checks it and its tests before it replaces
        the policy in force (a bad policy is refused, the old one stays).
      '';
    };

    metrics = {
      enable = lib.mkOption {
        type = lib.types.bool;
        default = true;
        description = "Serve Prometheus metrics (docs/grafana-dashboard.json).";
      };
      listen = lib.mkOption {
        type = lib.types.str;
        default = "127.0.0.1:9464";
        description = "ADDRESS:PORT of the metrics endpoint; loopback by default.";
      };
      openFirewall = lib.mkOption {
        type = lib.types.bool;
        default = false;
        description = "Open the metrics port (only useful with a non-loopback listen).";
      };
    };

    wireguardInterface = lib.mkOption {
      type = lib.types.nullOr lib.types.str;
      default = "netmaker";
      example = "nm-privacy";
      description = ''
        The Netmaker WireGuard interface socknet starts after (it waits for the
        device, then starts anyway: the kill switch does not depend on the mesh).
        null: no such ordering.
      '';
    };

    extraArgs = lib.mkOption {
      type = lib.types.listOf lib.types.str;
      default = [ ];
      example = [ "--log-level" "debug" ];
      description = "Extra arguments of `socknet run`.";
    };
  };

  config = lib.mkIf cfg.enable {
    assertions = [
      {
        assertion = cfg.hostConfig ? bridges;
        message = "services.socknet.hostConfig.bridges (mesh and socket) must be set.";
      }
    ];

    # Open vSwitch (NixOS module: ovsdb.service and vswitchd.service).
    virtualisation.vswitch.enable = lib.mkDefault true;

    environment.systemPackages = [ cfg.package ];

    # Copied (mode), not symlinked into the store: the controller watches the
    # policy file's path and re-reads it in place on reload.
    environment.etc."socknet/host.yaml" = { source = hostYaml; mode = "0400"; };
    environment.etc."socknet/policy.yaml" = lib.mkIf (policyFile != null) {
      source = policyFile;
      mode = "0400";
    };

    networking.firewall.allowedTCPPorts =
      lib.optional (cfg.metrics.enable && cfg.metrics.openFirewall) metricsPort;

    systemd.services.socknet = {
      description = "socknet OpenFlow controller (mesh and vmbr0 bridges)";
      wantedBy = [ "multi-user.target" ];
      wants = [ "ovsdb.service" "vswitchd.service" ] ++ wgDevice;
      after = [ "ovsdb.service" "vswitchd.service" "network-pre.target" ] ++ wgDevice;
      # host.yaml changed: restart (bootstrap runs again); policy changed: reload.
      restartTriggers = [ hostYaml ];
      reloadTriggers = lib.optional (policyFile != null) policyFile;
      # Never give up restarting: a stopped controller freezes the flows, it
      # never opens them.
      startLimitIntervalSec = 0;
      environment.PYTHONUNBUFFERED = "1";
      serviceConfig = {
        Type = "exec";
        ExecStartPre = "${socknet} bootstrap -c /etc/socknet/host.yaml";
        ExecStart = lib.escapeShellArgs
          ([ socknet "run" "-c" "/etc/socknet/host.yaml" ] ++ cfg.extraArgs);
        ExecReload = "${pkgs.coreutils}/bin/kill -HUP $MAINPID";
        Restart = "always";
        RestartSec = 1;
        RestartPreventExitStatus = 2;
        TimeoutStopSec = 10;

        # The same hardening as deploy/socknet.service.
        CapabilityBoundingSet = [ "CAP_NET_ADMIN" ];
        NoNewPrivileges = true;
        RestrictAddressFamilies = [ "AF_UNIX" "AF_INET" "AF_INET6" "AF_NETLINK" ];
        ProtectSystem = "strict";
        ReadWritePaths = [ "-/run/openvswitch" "-/var/run/openvswitch" ];
        StateDirectory = "socknet";  # /var/lib/socknet/pki: the OpenFlow channel's PKI
        StateDirectoryMode = "0700";
        ProtectHome = true;
        PrivateTmp = true;
        PrivateDevices = true;
        ProtectKernelTunables = true;
        ProtectKernelModules = true;
        ProtectKernelLogs = true;
        ProtectControlGroups = true;
        ProtectClock = true;
        ProtectHostname = true;
        ProtectProc = "invisible";
        RestrictNamespaces = true;
        RestrictRealtime = true;
        RestrictSUIDSGID = true;
        LockPersonality = true;
        SystemCallArchitectures = "native";
        SystemCallFilter = [ "@system-service" ];
        SystemCallErrorNumber = "EPERM";
        UMask = "0077";
      };
    };
  };
}
