from experiments.gas_sensor.cli import main

main()
